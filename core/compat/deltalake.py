"""deltalake: which ``CommitFailedError`` means another writer took the version.

delta-rs says so only in the message (deltalake 1.6): a conflict the checker found, a race for
the next log entry lost beyond delta-rs's own retries (on S3 each log entry is a conditional
put; several writers at once can lose it repeatedly), or a schema or protocol another writer
changed in between ("Metadata changed since last commit": two writers whose
``schema_mode="merge"`` both touched the table's metadata). The writer plans again on a fresh
snapshot; the rows are never dropped.
"""

from __future__ import annotations

TESTED = ("1.6", "1.7")
LOST_RACE = ("oncurrent", "exceeded maximum commit attempts", "Tried committing existing table version",
             "changed since last commit")


def lost_race(exc: Exception) -> bool:
    return any(text in str(exc) for text in LOST_RACE)


def moved() -> list[str]:
    from deltalake import exceptions

    return [] if hasattr(exceptions, "CommitFailedError") else ["deltalake.exceptions.CommitFailedError"]
