"""ASGI middleware of the service: one error shape, and a request body limit (413 before the
body is parsed).

Every 4xx and 5xx the service answers is ``{"error": message, "detail": [{"loc", "msg",
"type"}]}`` (``detail`` may be absent), whoever raised it: a validation error, BentoML's own
refusals (its 4xx came as a one-item list, its 413 and Starlette's 404/405 in other shapes), the
body limit or the readiness probe. ``/docs.json`` declares that shape for every status the
service can answer, so a client (or schemathesis) can rely on the document.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

ERROR_SCHEMA = {
    "Error": {
        "type": "object", "title": "Error", "required": ["error"],
        "description": "Every 4xx and 5xx of the service.",
        "properties": {
            "error": {"type": "string", "title": "Message"},
            "detail": {"type": "array", "title": "Detail", "items": {"$ref": "#/components/schemas/ErrorDetail"}},
        },
    },
    "ErrorDetail": {
        "type": "object", "title": "ErrorDetail", "required": ["loc", "msg", "type"],
        "description": "One problem: where (``loc``: body keys and indices), what, and its kind.",
        "properties": {
            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "msg": {"type": "string"}, "type": {"type": "string"},
        },
    },
}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "required": False,
                               "schema": {"type": "integer"}}}
# What each kind of route can answer besides its 200, and why.
API_ERRORS = {
    400: "The body or a record is invalid: ``detail`` names each field.",
    405: "Only POST.",
    413: "The body is over the configured limit.",
    415: "The body is not JSON.",
    429: "More requests in flight than the configured ``max_concurrency``: retry later.",
    500: "A fault of the service (logged with the request).",
    503: "The models are not loaded yet (or could not be): retry after ``Retry-After`` seconds.",
    504: "Not answered within the service's timeout.",
}
PROBE_ERRORS = {503: "Not ready, or not alive."}


def error_body(message: str, detail: list[dict[str, Any]] | None = None) -> bytes:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return json.dumps(body).encode()


def _detail(items: Any) -> list[dict[str, Any]] | None:
    if not isinstance(items, list):
        return None
    shaped = []
    for item in items:
        if isinstance(item, dict):
            shaped.append({"loc": [x if isinstance(x, int | str) else str(x) for x in item.get("loc") or []],
                           "msg": str(item.get("msg", "")), "type": str(item.get("type", "error"))})
    return shaped


def normalized(status: int, body: bytes) -> dict[str, Any]:
    """The one error shape, from whatever shape ``body`` came in."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    try:
        data: Any = json.loads(body) if body else None
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return {"error": text or phrase}
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML answers its 4xx exceptions as a one-item list
    if not isinstance(data, dict):
        return {"error": phrase}
    shaped = {k: v for k, v in data.items() if k not in ("error", "detail")}  # e.g. /admin/reload's status
    detail = data.get("detail")
    if isinstance(data.get("error"), str):
        shaped["error"] = data["error"]
        if isinstance(detail, str):
            shaped["detail"] = [{"loc": [], "msg": detail, "type": "error"}]
    elif isinstance(detail, str):
        shaped["error"] = detail
    else:
        shaped["error"] = phrase
    if (listed := _detail(detail)) is not None:
        shaped["detail"] = listed
    return shaped


def declare_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """What BentoML's document leaves out about an API's body: it is required when the input
    has required fields, and an ``x: str | None = None`` argument takes null too (``nullable``,
    OpenAPI 3.0), not only a string."""
    for item in spec.get("paths", {}).values():
        request = (item.get("post") or {}).get("requestBody", {})
        body = request.get("content", {}).get("application/json", {})
        if body.get("schema", {}).get("required"):
            request["required"] = True
        for field in body.get("schema", {}).get("properties", {}).values():
            if "default" in field and field["default"] is None and "type" in field:
                field["nullable"] = True
    return spec


def declare_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (the service's OpenAPI document) with the one error shape declared for every
    status each route can answer, in place of BentoML's InvalidArgument/NotFound/... schemas
    (their ``detail`` is a string; the service sent a list, or nothing)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(unused, None)
    schemas.update(ERROR_SCHEMA)
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            api = method == "post" and operation.get("x-bentoml-name") is not None
            errors = API_ERRORS if api else PROBE_ERRORS if path in ("/readyz", "/livez", "/healthz") else {}
            responses = {code: answer for code, answer in operation["responses"].items() if int(code) < 400}
            for status, why in errors.items():
                answer: dict[str, Any] = {"description": why, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                if status in (503,):
                    answer["headers"] = RETRY_AFTER
                responses[str(status)] = answer
            operation["responses"] = responses
    return spec


class ErrorShape:
    """Rewrite every 4xx/5xx answer of the app into the one error shape (headers such as
    ``Allow`` and ``WWW-Authenticate`` kept), and declare it in ``/docs.json``."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope.get("method") == "GET" and scope.get("path") == "/docs.json"
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def shaping_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                if message["status"] >= 400 or (docs and message["status"] == 200):
                    held["start"] = message
                    return
                await send(message)
                return
            if message["type"] != "http.response.body" or "start" not in held:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            start, body = held.pop("start"), b"".join(chunks)
            if start["status"] >= 400:
                body = json.dumps(normalized(start["status"], body)).encode()
            else:
                body = json.dumps(declare_inputs(declare_errors(json.loads(body)))).encode()
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, shaping_send)


class BodyLimit:
    """Refuse bodies over ``max_bytes``: by Content-Length at once, else while streaming."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0
        refused = False

        async def limited() -> dict:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    raise _TooLarge
            return message

        answered = False

        async def guarded_send(message: dict) -> None:
            # Once the body went over the limit, whatever the app answers (its error page)
            # is replaced by the 413.
            nonlocal answered
            if refused:
                if not answered:
                    answered = True
                    await self._refuse(send)
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not refused:
                raise
        if refused and not answered:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = error_body(f"request body over the limit of {self.max_bytes} bytes")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class JsonOnly:
    """A body sent to one of ``paths`` as anything but JSON gets a 415 naming what came (BentoML
    answered a multipart body without a boundary with a 500). No Content-Type reads as JSON."""

    def __init__(self, app: Any, paths: tuple[str, ...]):
        self.app, self.paths = app, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") in self.paths:
            sent = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
            media = sent.split(";", 1)[0].strip().lower()
            if media and media != "application/json" and not media.endswith("+json"):
                body = error_body(f"the body must be JSON (Content-Type: application/json), not {media[:100]!r}")
                await send({"type": "http.response.start", "status": 415,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass
