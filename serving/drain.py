"""Draining before a stop, so that a stop under load cuts nothing a client sent.

``flows.deploy stop`` sends SIGUSR1 to each worker, waits ``serving.drain_s`` and then sends
SIGTERM. On SIGUSR1 a worker:

1. fails ``/readyz`` (a balancer or a Kubernetes Service stops sending) and answers every
   request with ``Connection: close``, so no client sends its next request on a keep-alive
   connection the server is about to close (a client sees that as a reset);
2. after ``drain_s``, stops taking connections: the listening socket leaves the event loop and
   is shut down, so a new connection is refused at once. Without this the socket stays open in
   BentoML's arbiter while the workers finish, connections pile up in its backlog, and the
   kernel resets every one of them when the arbiter closes it (each client saw one reset).

The SIGTERM then answers every request taken and flushes the prediction log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import Any

log = logging.getLogger("flywheel.serving")

DRAINING = threading.Event()


def begin(drain_s: float, port: int) -> bool:
    """Start draining (in the worker's event loop); False if it had begun already."""
    if DRAINING.is_set():
        return False
    DRAINING.set()
    asyncio.get_running_loop().call_later(drain_s, stop_listening, port)
    return True


def stop_listening(port: int) -> int:
    """Stop accepting on this process's listening sockets for ``port``: out of the event loop
    first (an accept on a shut-down socket fails at once, and the loop would spin on it), then
    shut down, which refuses new connections for every process sharing the socket. The number
    of sockets stopped."""
    import psutil

    loop = asyncio.get_running_loop()
    stopped = 0
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.laddr.port != port or conn.fd < 0:
            continue
        loop.remove_reader(conn.fd)
        shared = socket.socket(fileno=os.dup(conn.fd))
        try:
            shared.shutdown(socket.SHUT_RD)
            stopped += 1
        except OSError as exc:  # shut down already, by a sibling worker
            log.debug("listening socket %d: %s", conn.fd, exc)
        finally:
            shared.close()
    log.info("stopped taking connections on port %d (%d socket(s))", port, stopped)
    return stopped


class CloseWhenDraining:
    """ASGI middleware: while draining, every response says ``Connection: close``."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not DRAINING.is_set():
            await self.app(scope, receive, send)
            return

        async def closing(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)
