"""What every flow entry point shares: the CLI, settings, the lake, logging into Prefect."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from core.artifacts import artifact_key  # noqa: F401 - the flows take it from here
from core.cli import parse
from core.compat.prefect import detach_temporary_server, start_temporary_server
from core.lake import Lake
from core.lifetime import guard
from core.settings import Settings, configure, get_settings

M = TypeVar("M", bound=BaseModel)

OUR_LOGGERS = ("tasks", "compute", "core", "flows", "serving", "monitoring")


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


def run_started(level: int | str | None = None) -> None:
    """The first call of every flow body, once its run is running: our modules' logs go to the
    run (``tasks.*``, ``compute.*``, ``core.*``, at the settings' ``log_level`` unless given),
    and, the API having been reached, every Prefect client of this process retries a refused
    connection from then on (``core.compat.prefect``; before a run, a wrong ``PREFECT_API_URL``
    fails at once). Idempotent."""
    from core.compat.prefect import retry_refused_connections

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
    retry_refused_connections()


STACK_STATE = ("stack", "stack.json")  # devstack's record of what `make up` started


def running_stack_api(home: Any) -> str | None:
    """The Prefect API of ``make up``'s stack for ``home`` when its record names a Prefect
    server and that port answers on 127.0.0.1; else None."""
    import json
    import socket
    from pathlib import Path

    try:
        stack = json.loads(Path(home, *STACK_STATE).read_text())
        port = int(stack["ports"]["prefect"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not any(part.get("name") == "prefect-server" for part in stack.get("parts", [])):
        return None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            pass
    except OSError:
        return None
    return f"http://127.0.0.1:{port}/api"


def use_running_stack(argv: list[str]) -> str | None:
    """Point Prefect at the running stack's server (``running_stack_api``) for this command
    (home: ``--home`` on the command line, else the settings'); says so on stderr. Called
    before Prefect is imported, which reads ``PREFECT_API_URL`` once."""
    home: Any = None
    for i, arg in enumerate(argv):
        if arg == "--home" and i + 1 < len(argv):
            home = argv[i + 1]
        elif arg.startswith("--home="):
            home = arg.split("=", 1)[1]
    try:
        home = home or get_settings().home
    except Exception:  # noqa: BLE001 - bad settings are reported by the command itself
        return None
    api = running_stack_api(home)
    if api:
        os.environ["PREFECT_API_URL"] = api
        print(f"flywheel: reporting to the Prefect server of the running stack ({api.removesuffix('/api')}); "
              "set PREFECT_API_URL to use another", file=sys.stderr)
    return api


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
            from core.errors import is_user_facing

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


def cli_args(argv: list[str]) -> list[str]:
    """``python -m flows.registry rollback ...`` reads as ``--action rollback ...`` (a first word
    that is no action is refused by the parser, naming the actions)."""
    if argv and not argv[0].startswith("-"):
        return ["--action", *argv]
    return argv


def read_only(argv: list[str], actions: tuple[str, ...], default: str) -> bool:
    """Whether this command line asks for one of the read-only ``actions`` (no action named:
    ``default``), which ``answer`` gives without a flow run."""
    args = cli_args(argv)
    action = args[1] if args[:1] == ["--action"] and len(args) > 1 else default
    return action in actions and "--help" not in args and "-h" not in args


def answer(read: Callable[[M], Any], model: type[M], argv: list[str] | None, prog: str,
           report: Callable[[Any], None]) -> int:
    """A read-only command without a flow run: no Prefect server, no run in the UI, the
    answer in well under the seconds a flow's start costs. Same CLI, same errors as ``main``."""
    params, overrides = parse(model, argv, prog)
    debug = overrides.pop("debug", False)
    configure(**overrides)
    try:
        result = read(params)
    except Exception as exc:
        from core.errors import is_user_facing

        if debug or not is_user_facing(exc):
            raise
        print(f"{prog} failed: {exc}", file=sys.stderr)
        return 1
    report(result)
    return 0


def main(flow: Callable[[M], Any], model: type[M], argv: list[str] | None, prog: str,
         report: Callable[[Any], None] | None = None,
         prepare: Callable[[M, Settings], None] | None = None) -> int:
    """Parse the CLI into the flow's parameter model, run the flow, print a summary.

    Prefect's temporary server (no ``PREFECT_API_URL``) starts in the background at once;
    ``prepare(params, settings)``, given, runs meanwhile: warm-up the flow would otherwise do at
    its start (imports, opening stores). It must make
    no Prefect client, and it is best effort: what it raises is logged at debug level and left
    to the flow, which does the same work and reports its errors as a run.

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
    started = time.perf_counter()
    # core.compat.prefect: Prefect's temporary server (no API URL) starts now, while `prepare`
    # runs, in its own session and tied to this command
    server_ready = start_temporary_server()
    if server_ready is None:
        detach_temporary_server()
    if prepare is not None:
        try:
            prepare(params, settings)
        except Exception:  # noqa: BLE001 - the flow does the same work and reports its errors
            logging.getLogger("flywheel").debug("%s: preparation failed; left to the flow", prog, exc_info=True)
    if server_ready is not None:
        server_ready()
    name = getattr(flow, "name", prog)
    try:
        return _run(flow, params, settings, name, prog, debug, report, started)
    finally:
        ends_the_process()


def _run(flow: Callable[[M], Any], params: M, settings: Settings, name: str, prog: str, debug: bool,
         report: Callable[[Any], None] | None, started: float) -> int:
    try:
        result = flow(params)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the flow already logged the traceback in Prefect
        from core.errors import is_user_facing

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


def ends_the_process() -> None:
    """What ``main`` does last (its caller exits): the heap is frozen out of the garbage
    collector (``gc.freeze``). The interpreter's exit collects garbage over and over as it tears
    the modules down; with Prefect, MLflow, Ray, PyTorch and pandas loaded that took 2-8 s after
    the command's work was done (the exit handlers still run: the temporary server and Ray stop,
    files and runs close, as before; the memory goes back to the system with the process)."""
    import gc

    gc.freeze()
