"""What every flow entry point shares: the CLI, settings, the lake, logging into Prefect."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from core.cli import parse
from core.lake import Lake
from core.lifetime import guard
from core.settings import Settings, configure, get_settings

M = TypeVar("M", bound=BaseModel)

OUR_LOGGERS = ("tasks", "compute", "core", "flows")


class _RunLogBridge(logging.Handler):
    """Send our modules' log records to the current Prefect run's logger (UI and terminal)."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        try:
            logger = get_run_logger()
        except MissingContextError:
            logging.getLogger("flywheel").handle(record)
            return
        logger.log(record.levelno, record.getMessage())


def bridge_logs(level: int | str | None = None) -> None:
    """Route ``tasks.*``, ``compute.*``, ``core.*`` logs into Prefect (idempotent), at the
    settings' ``log_level`` unless given."""
    if level is None:
        level = get_settings().log_level
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _RunLogBridge) for h in logger.handlers):
            logger.addHandler(_RunLogBridge())
        logger.setLevel(level)
        logger.propagate = False
    fallback = logging.getLogger("flywheel")
    if not fallback.handlers:
        fallback.addHandler(logging.StreamHandler(sys.stderr))
        fallback.setLevel(level)
    survive_api_restarts()


def survive_api_restarts() -> None:
    """Called once a flow run is running (so the Prefect API was reached): from then on every
    Prefect client of this process retries a refused connection, as Prefect's first client
    does, for about two minutes (``PREFECT_CLIENT_MAX_RETRIES``).

    Prefect 3.9 retries ``httpx.ConnectError`` only on a client instance that has connected
    before (``_has_connected``), and the engine makes fresh clients as a run goes on (subflows,
    task runs): during a server restart those failed at once and crashed the run
    (``tests/test_outage.py``). A Prefect without that attribute is left as it is."""
    from prefect.client import base

    for cls in (base.PrefectHttpxAsyncClient, base.PrefectHttpxSyncClient):
        if getattr(cls, "_flywheel_retries_refused", False):
            continue
        original = cls.__init__

        def init(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            _original(self, *args, **kwargs)
            if hasattr(self, "_has_connected"):
                self._has_connected = True

        cls.__init__ = init  # type: ignore[method-assign]
        setattr(cls, "_flywheel_retries_refused", True)  # noqa: B010 - a mark on a class that is not ours


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from names."""
    return "-".join("".join(c if c.isalnum() else "-" for c in part.lower()) for part in parts)


def model_name_for(dataset: str, smoke_test: bool = False) -> str:
    """The registered model name of ``dataset`` (settings ``train.model_name``; smoke tests
    register under their own name)."""
    return get_settings().train.model_name.format(dataset=dataset) + ("-smoke" if smoke_test else "")


def lake_for(settings: Settings, smoke_test: bool = False) -> Lake:
    """The lake; smoke tests write to a separate root so they never touch real tables."""
    root = settings.lake.rstrip("/") + ("/_smoke" if smoke_test else "")
    return Lake(root, settings.storage_options or None)


def prefect_defaults(settings: Settings) -> None:
    """Quiet, local Prefect defaults for entry points (explicit environment wins)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # A Prefect server that goes away mid-run (a restart, an outage): the client retries each
    # call with exponential back-off, 2 + 4 + ... + 64 s, about two minutes in all (Prefect's
    # default of 5 retries gives up after about one), and the run carries on where it was.
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "6")


class _NoUserFacingTracebacks(logging.Filter):
    """Drop the traceback from console records of errors whose message says it all (a bad
    table name, an unreadable file, a rejected batch): one clear line instead of fifty."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            from tasks.errors import is_user_facing

            if is_user_facing(record.exc_info[1]):
                record.exc_info, record.exc_text = None, None
        return True


def quiet_tracebacks() -> None:
    """Install the filter on the console handlers Prefect set up (idempotent)."""
    for name in ("prefect", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                    isinstance(f, _NoUserFacingTracebacks) for f in handler.filters):
                handler.addFilter(_NoUserFacingTracebacks())


def detach_temporary_server() -> None:
    """Start Prefect's temporary API server (used when no PREFECT_API_URL is set) in its own
    session. In the terminal's process group, Ctrl-C killed it together with the flow, which
    then retried for minutes to report its own crash to a server that was gone."""
    import subprocess
    import types

    from prefect.server.api import server

    from core.lifetime import tie

    if isinstance(server.subprocess, types.SimpleNamespace):
        return

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen:
        process = subprocess.Popen(*args, **{**kwargs, "start_new_session": True})
        tie([process.pid])  # in its own session it would outlive a SIGKILLed flow: it ends with us
        return process

    shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess) if not k.startswith("__")})
    shim.Popen = popen
    server.subprocess = shim  # type: ignore[assignment]


def push_outcome(settings: Settings, flow_name: str, failed: bool) -> None:
    """With ``monitor.pushgateway`` set: the flow's last outcome as gauges for Prometheus
    (``flywheel_flow_run_failed{flow=...}``, the FlywheelFlowRunFailed alert). Best effort: a
    Pushgateway that cannot be reached is logged, the command's result stands."""
    if not settings.monitor.pushgateway:
        return
    from tasks.monitor import push_gauges

    try:
        push_gauges(settings.monitor.pushgateway, "flywheel_flows",
                    {"flywheel_flow_run_failed": float(failed), "flywheel_flow_run_last_timestamp_seconds": time.time()},
                    {"flow": flow_name})
    except Exception as exc:  # noqa: BLE001 - monitoring must not fail the work it reports on
        logging.getLogger("flywheel").warning("could not push the flow outcome to %s: %s",
                                              settings.monitor.pushgateway, exc)


def main(flow: Callable[[M], Any], model: type[M], argv: list[str] | None, prog: str,
         report: Callable[[Any], None] | None = None) -> int:
    """Parse the CLI into the flow's parameter model, run the flow, print a summary.

    A failure explained by its message prints that message alone; ``--debug`` shows the
    traceback too.
    """
    params, overrides = parse(model, argv, prog)
    debug = overrides.pop("debug", False)
    if not debug:
        quiet_tracebacks()
    settings = configure(**overrides)
    settings.ensure_home()
    prefect_defaults(settings)
    guard()  # what this command starts for itself (Prefect's temporary server, a local Ray) ends with it
    detach_temporary_server()
    started = time.perf_counter()
    name = getattr(flow, "name", prog)
    try:
        result = flow(params)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the flow already logged the traceback in Prefect
        from tasks.errors import is_user_facing

        push_outcome(settings, name, failed=True)
        if debug or not is_user_facing(exc):
            raise
        print(f"\n{prog} failed: {exc}", file=sys.stderr)
        return 1
    push_outcome(settings, name, failed=False)
    if report:
        report(result)
    print(f"{prog} finished in {time.perf_counter() - started:.1f}s")
    return 0
