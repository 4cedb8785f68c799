"""One base for the errors whose message is the whole story for a user: the command prints it
without a traceback (``--debug`` shows one). Every library error derives from it: contract,
features, lake, registry, sources, validation, stream, model families, deploy."""

from __future__ import annotations


class FlywheelError(RuntimeError):
    """A failure explained in its message (bad option, missing table version, ...)."""


def is_user_facing(exc: BaseException) -> bool:
    return isinstance(exc, FlywheelError)
