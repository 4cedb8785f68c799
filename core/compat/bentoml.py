"""bentoml: the per-request timeout timer cancelled once the response starts.

BentoML's ``TimeoutMiddleware`` (bentoml 1.4.40, ``traffic.timeout``) schedules
``loop.call_later(timeout, ...)`` for every request and never cancels it. The timer holds the
request's future, and through its context the request's tracing span, its futures and their
callbacks, for the whole timeout (our 30 s) after the response was sent: at 500 requests a
second a worker carries some 15,000 finished requests, about 450,000 objects, and each full
garbage collection walks them (300-500 ms on 2 cores, a stall every request in flight waits
out: the service's p99).

``cancel_request_timers`` replaces the middleware's ``__call__`` with the same behaviour (a 504
after ``timeout`` seconds without a response start) that cancels the timer when the response
starts, or when the app ends without one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from core.compat import warn_untested

TESTED = ("1.4.40", "1.5")


def cancel_request_timers() -> bool:
    """Idempotent; call before the service's app is built (importing the service module)."""
    from bentoml._internal.server.http import traffic

    warn_untested("bentoml", TESTED)
    middleware = traffic.TimeoutMiddleware
    if getattr(middleware.__call__, "flywheel_cancels_timer", False):
        return True

    async def call(self: Any, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        def started(_: Any = None) -> None:
            if not waiter.done():
                waiter.set_result(None)
            timer.cancel()

        async def _send(message: dict) -> None:
            started()
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        fut.add_done_callback(started)  # an app that ends without a response: no 30 s wait either
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                from starlette.responses import JSONResponse

                response = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                        status_code=504)
                await response(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()  # this call itself cancelled before the app ended

    call.flywheel_cancels_timer = True  # type: ignore[attr-defined]
    middleware.__call__ = call  # type: ignore[method-assign,assignment]
    return True


def moved() -> list[str]:
    import inspect

    from bentoml._internal.server.http import traffic

    middleware = getattr(traffic, "TimeoutMiddleware", None)
    if middleware is None:
        return ["bentoml._internal.server.http.traffic.TimeoutMiddleware"]
    found = []
    if not callable(getattr(middleware, "_set_timer_out", None)):
        found.append("TimeoutMiddleware._set_timer_out")
    if list(inspect.signature(middleware.__init__).parameters) != ["self", "app", "timeout"]:
        found.append("TimeoutMiddleware.__init__(app, timeout)")
    return found
