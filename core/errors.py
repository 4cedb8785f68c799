"""Errors whose message is the whole story for a user: printed without a traceback."""

from __future__ import annotations


def is_user_facing(exc: BaseException) -> bool:
    from core.contract import ContractError
    from core.features import FeatureError
    from core.lake import LakeError
    from core.registry import RegistryError
    from core.sources import SourceError
    from core.validation import ValidationError

    return isinstance(exc, ContractError | FeatureError | LakeError | RegistryError | SourceError
                      | ValidationError | FlywheelError)


class FlywheelError(RuntimeError):
    """A failure explained in its message (bad option, missing table version, ...)."""
