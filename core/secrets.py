"""Masking credentials in text we produce: source descriptions, error messages, log lines.

Sources are configured with URLs that carry secrets (``user:pass@`` user info, ``?api_key=``
query parameters) and libraries embed those URLs in their error texts. Everything a source
says about where it read from goes through :func:`mask_url` or :func:`mask_text` first, so a
secret never reaches a log, a Prefect artifact or a Delta commit. The location itself (scheme,
host, port, path, the names of parameters) stays visible: a user needs to see what was read.

Standard library only: imported by ``core.contract``.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"

# Parameter names that hold secrets, compared after normalising: lower case, camelCase split
# and '-' or '.' read as '_'. A name matches when it is one of these or ends with '_' + one of
# these (x_api_key, aws_secret_access_key, X-Amz-Signature, accessToken).
SECRET_NAMES = frozenset({
    "password", "passwd", "pwd", "pass", "key", "api_key", "apikey", "access_key", "secret",
    "client_secret", "token", "access_token", "auth", "authorization", "signature", "sig",
    "credential", "credentials", "session",
})

# A ${VAR} reference is a placeholder, not a secret: templates keep it visible.
_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# scheme://user:password@ - the password runs to the last '@' before the host's '/', '?' or '#'.
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@'\"<>]*:)(?P<password>[^\s/?#'\"<>]*)@")
# name=value in a query, a fragment, a libpq conninfo string or a free-text message.
_PARAM = re.compile(
    r"(?P<head>(?:^|(?<=[?&;#\s,(\[{]))(?P<name>[A-Za-z0-9_.%\-]+)=)(?P<value>[^&#\s'\"<>]*)")
# 'name': 'value' in a repr or JSON of a dict (error texts that print their kwargs).
_MAPPING = re.compile(
    r"(?P<head>(?P<q>['\"])(?P<name>[A-Za-z0-9_.\-]+)(?P=q)\s*:\s*(?P<vq>['\"]))(?P<value>.*?)(?P=vq)")
_BEARER = re.compile(r"\b(?P<head>Bearer\s+)(?P<value>[A-Za-z0-9\-._~+/]+=*)")
_TRAILING = ").,;:]}"


def is_secret_name(name: str) -> bool:
    """Whether a parameter or header name looks like it holds a secret (``x_api_key``: yes)."""
    normal = _CAMEL.sub("_", unquote(name)).lower().replace("-", "_").replace(".", "_")
    return normal in SECRET_NAMES or any(normal.endswith("_" + s) for s in SECRET_NAMES)


def _hide(value: str) -> str:
    if not value or _REFERENCE.fullmatch(value):
        return value
    return MASK


def _mask_param(match: re.Match[str]) -> str:
    if not is_secret_name(match["name"]):
        return match[0]
    value = match["value"]
    if _REFERENCE.fullmatch(value):
        return match[0]
    # Punctuation that ends a sentence around the URL stays outside the mask.
    kept = value.rstrip(_TRAILING)
    return match["head"] + _hide(kept) + value[len(kept):]


def mask_url(url: str) -> str:
    """The URL with its credentials replaced by ``***``: the password of ``user:pass@`` and the
    values of query or fragment parameters with secret-looking names. Scheme, user, host,
    port, path and the other parameters are kept, so the result still says what was read.
    A ``${VAR}`` placeholder is not a secret and stays. The password must be percent-encoded
    as RFC 3986 asks (a raw '/' ends it); render SQLAlchemy URLs with
    ``render_as_string(hide_password=True)`` first, which parses them its own way.

    >>> mask_url("postgresql://u:pw@db:5432/x?sslmode=require&password=pw")
    'postgresql://u:***@db:5432/x?sslmode=require&password=***'
    """
    return mask_text(url)


def mask_text(text: str) -> str:
    """``text`` with credentials masked in every URL inside it, and in ``name=value``,
    ``'name': 'value'`` and ``Bearer <token>`` forms: for library error messages that embed
    the URL they failed on (or only its path and query)."""
    text = _USERINFO.sub(lambda m: m["head"] + _hide(m["password"]) + "@", text)
    text = _PARAM.sub(_mask_param, text)
    text = _MAPPING.sub(
        lambda m: m["head"] + _hide(m["value"]) + m["vq"] if is_secret_name(m["name"]) else m[0], text)
    return _BEARER.sub(lambda m: m["head"] + _hide(m["value"]), text)
