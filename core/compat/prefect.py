"""Prefect: two patches every flow entry point applies (``flows._runtime.main``).

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
"""

from __future__ import annotations

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
    return found
