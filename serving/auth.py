"""The admin routes' bearer token: from the environment only; none configured means refused."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

ADMIN_TOKEN_ENV = "FLYWHEEL_SERVING_ADMIN_TOKEN"


def refusal(headers: Mapping[str, str]) -> tuple[int, str] | None:
    """None if ``headers`` carry the configured token; else (status, reason). Never open:
    without ``FLYWHEEL_SERVING_ADMIN_TOKEN`` every request is refused (403)."""
    expected = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not expected:
        return 403, f"admin routes are disabled: set {ADMIN_TOKEN_ENV} to enable them"
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        return 401, "a valid bearer token is required"
    return None
