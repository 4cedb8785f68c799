"""Prefect: what every flow entry point applies (``flows._runtime.main``).

- ``retry_refused_connections``: Prefect 3.9 retries ``httpx.ConnectError`` only on a client
  instance that has connected before (``_has_connected``), and the engine makes fresh clients
  as a run goes on (subflows, task runs): during a server restart those failed at once and
  crashed the run (``tests/test_outage.py``). Every client of this process then retries a
  refused connection, as Prefect's first client does, for about two minutes
  (``PREFECT_CLIENT_MAX_RETRIES``).
- ``detach_temporary_server``: the temporary API server (used when no ``PREFECT_API_URL`` is
  set) starts in its own session. In the terminal's process group, Ctrl-C killed it together
  with the flow, which then retried for minutes to report its own crash to a server that was
  gone. Out of the group it would outlive a SIGKILLed flow, so it is tied to the command's
  lifetime (``core.lifetime``).
- ``start_temporary_server``: that server takes seconds to start (a Python process importing
  Prefect's server, opening its database, starting its services); started by the entry point
  at once, it starts while the command does its own preparation (imports, the MLflow store)
  instead of at the flow's first API call, and it is then Prefect's own temporary server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.compat import warn_untested

TESTED = ("3.9", "3.10")
_MARK = "_flywheel_retries_refused"


def retry_refused_connections() -> bool:
    """Idempotent; False where this Prefect's clients have no ``_has_connected`` (left alone)."""
    from prefect.client import base

    warn_untested("prefect", TESTED)
    patched = False
    for cls in (base.PrefectHttpxAsyncClient, base.PrefectHttpxSyncClient):
        if getattr(cls, _MARK, False):
            patched = True
            continue
        original = cls.__init__

        def init(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            _original(self, *args, **kwargs)
            if hasattr(self, "_has_connected"):
                self._has_connected = True

        cls.__init__ = init  # type: ignore[method-assign]
        setattr(cls, _MARK, True)
        patched = True
    return patched


def detach_temporary_server() -> bool:
    """Idempotent; False where Prefect's server module no longer starts it through
    ``subprocess`` (left alone)."""
    import subprocess
    import types

    from prefect.server.api import server

    from core.lifetime import tie

    warn_untested("prefect", TESTED)
    if isinstance(server.subprocess, types.SimpleNamespace):
        return True
    if server.subprocess is not subprocess:
        return False

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
        process = subprocess.Popen(*args, **{**kwargs, "start_new_session": True})
        tie([process.pid])  # in its own session it would outlive a SIGKILLed flow: it ends with us
        return process

    shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")})
    shim.Popen = popen
    server.subprocess = shim  # type: ignore[assignment]
    return True


# What Prefect's SubprocessASGIServer._run_uvicorn_command gives the temporary server.
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def start_temporary_server() -> Callable[[], None] | None:
    """Where this process would use Prefect's temporary server (no ``PREFECT_API_URL``), start
    it now; returns a function that waits until it answers. None where none is used.

    The server process is started at once, with Prefect's own command line and environment
    (``SubprocessASGIServer._run_uvicorn_command``), in its own session and tied to this
    process (as ``detach_temporary_server`` does), before this process has imported Prefect's
    server module (about 3 s of CPU, which it needs later anyway): that import, and whatever
    the caller does meanwhile, overlap the server's own start. A background thread then hands
    the process to Prefect's ``SubprocessASGIServer`` instance, the one Prefect's clients take
    (it stops it at exit, as usual), and waits for ``/health``. Call the returned function
    before anything makes a Prefect client: one made sooner would find the server not yet
    answering. A server that fails to start is left to Prefect: its first client starts one
    again (``detach_temporary_server``'s way) and reports what goes wrong."""
    import atexit
    import os
    import subprocess
    import sys
    import threading

    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings

    from core.lifetime import tie

    warn_untested("prefect", TESTED)
    if PREFECT_API_URL.value():
        return None
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env={**os.environ, **_SERVER_ENV, **get_current_settings().to_environment_variables(exclude_unset=True)},
        start_new_session=True)
    tie([process.pid])  # in its own session it would outlive a SIGKILLed command: it ends with it

    def adopt() -> None:
        import time

        import httpx
        from prefect.server.api import server as module
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        detach_temporary_server()  # should Prefect have to start one after all
        server = module.SubprocessASGIServer()
        if server.running:  # started meanwhile by someone else: theirs is the one
            process.terminate()
            return
        module.subprocess_server_logger.info(
            "Starting temporary server on http://127.0.0.1:%d\nSee https://www.prefect.io/docs/v3/concepts/server"
            "#how-to-guides for more information on running a dedicated Prefect server.", port)
        server.port, server.server_process, server.running = port, process, True
        atexit.register(server.stop)
        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        with httpx.Client() as client:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    if client.get(f"{server.api_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        server.stop()  # not answering: Prefect's first client starts one and says why it cannot
        server.running, server.port = False, None

    def adopt_or_end() -> None:
        try:
            adopt()
        except Exception:  # noqa: BLE001 - Prefect's first client starts its own and says what is wrong
            process.terminate()

    thread = threading.Thread(target=adopt_or_end, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread.join


def _free_port() -> int:
    """A free port of 127.0.0.1 in Prefect's range for its temporary server (8000-8999)."""
    import random
    import socket

    for _ in range(50):
        port = random.randrange(8000, 9000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for Prefect's temporary server in 8000-8999")


def moved() -> list[str]:
    import subprocess
    import types

    from prefect.client import base
    from prefect.server.api import server

    found = []
    for cls in (base.PrefectHttpxAsyncClient, base.PrefectHttpxSyncClient):
        client = cls(base_url="http://127.0.0.1:9")
        if not hasattr(client, "_has_connected"):
            found.append(f"{cls.__qualname__}._has_connected")
    if not (server.subprocess is subprocess or isinstance(server.subprocess, types.SimpleNamespace)):
        found.append("prefect.server.api.server.subprocess")
    if not callable(getattr(server.SubprocessASGIServer, "start", None)):
        found.append("prefect.server.api.server.SubprocessASGIServer.start")
    probe = server.SubprocessASGIServer(port=9)
    try:
        if not all(hasattr(probe, k) for k in ("port", "server_process", "running", "api_url", "stop")):
            found.append("prefect.server.api.server.SubprocessASGIServer (port, server_process, running)")
    finally:
        server.SubprocessASGIServer._instances.pop(9, None)
    if not callable(getattr(server, "create_app", None)):
        found.append("prefect.server.api.server.create_app")
    return found
