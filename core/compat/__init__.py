"""Every change Flywheel makes to a library's private behaviour, one module per library.

Each module names the versions its patches were tested on (``TESTED``, also pinned in
``pyproject.toml``), and ``moved()`` lists the private symbols it relies on that are not where
they were: ``tests/test_compat.py`` fails on an upgrade that moved one, before anything runs on
it. A patch is a function an entry point calls; importing a module here changes nothing, and
imports the library only when a patch is applied.

- ``compat.prefect``: clients that retry a refused connection; the temporary API server in
  its own session, tied to the command's lifetime.
- Ray's (a local Ray kept on loopback) is ``compute/ray_compat.py``: ``compute/`` alone knows
  Ray, and it has the same ``TESTED`` and ``moved()``.
- ``compat.torch``: the DDP rendezvous store bound to a loopback address.
- ``compat.deltalake``: which commit failures mean another writer won the race.
- ``compat.bentoml``: the per-request timeout timer cancelled once the response starts (it
  kept every finished request for ``traffic.timeout``).
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger("core.compat")


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def untested(package: str, tested: tuple[str, str]) -> str | None:
    """Why the installed ``package`` is outside ``tested`` (low inclusive, high exclusive), or
    None when it is inside."""
    try:
        installed = version(package)
    except PackageNotFoundError:
        return f"{package} is not installed"
    low, high = tested
    if _release(low) <= _release(installed) < _release(high):
        return None
    return f"{package} {installed} is outside the tested range >={low},<{high}"


def warn_untested(package: str, tested: tuple[str, str]) -> None:
    problem = untested(package, tested)
    if problem:
        log.warning("%s: Flywheel's patches of it may not apply (see core/compat)", problem)
