"""Sticky champion/challenger routing: a routing key hashed to a stable point in [0, 1)."""

from __future__ import annotations

import hashlib
import uuid
from typing import Literal

Variant = Literal["champion", "challenger"]


def bucket(key: str) -> float:
    """A point in [0, 1) that depends on the key alone (the same in every process and run)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def route(key: str | None, challenger_share: float, has_challenger: bool) -> tuple[Variant, str]:
    """(variant, the key used): keys below the share go to the challenger. No key: a random one."""
    used = key if key else uuid.uuid4().hex
    if has_challenger and challenger_share > 0 and bucket(used) < challenger_share:
        return "challenger", used
    return "champion", used
