"""Open Ray from settings: a local Ray by default, a cluster address when given."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.settings import RaySettings

log = logging.getLogger(__name__)


class _EarlyStart:
    """``ray.init`` under way in a background thread (``start_early``).

    The thread lives on until the session ends (``release``): Ray ties its GCS and raylet to
    the thread that started them (Linux ``PR_SET_PDEATHSIG`` fires when that *thread* exits),
    so a thread that returned after ``ray.init`` would take them down with it. A daemon: at
    exit, Ray's own exit handler has shut Ray down, and the waiting thread ends with the process.
    """

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self._release = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ray-early-start", daemon=True)

    def _run(self) -> None:
        try:
            _init(self.settings, in_thread=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the session that takes this start
            self.error = exc
            return
        finally:
            self.ready.set()
        self._release.wait()

    def release(self) -> None:
        self._release.set()


_early: _EarlyStart | None = None
_early_lock = threading.Lock()


def start_early(settings: RaySettings) -> bool:
    """Begin ``ray.init`` for ``settings`` in a background thread, so that a local Ray's
    processes (GCS, raylet, workers) start while the caller does other work (ingest, ETL):
    they take seconds. The next ``ray_session`` waits for it and owns that Ray, as if it had
    started it (shut down on exit). False, and nothing started, where Ray already runs in this
    process or a start is already under way."""
    global _early
    with _early_lock:
        if _early is not None:
            return False
        ray = sys.modules.get("ray")  # not imported here: the thread imports it (a second of CPU)
        if ray is not None and ray.is_initialized():
            return False
        _prepare_environment(settings)
        _early = _EarlyStart(settings)
        _early.thread.start()
        return True


@contextmanager
def started_early(settings: RaySettings) -> Iterator[bool]:
    """``start_early`` for the block; a Ray it started that no ``ray_session`` took by the
    block's end (the work failed before it needed Ray) is shut down there."""
    started = start_early(settings)
    try:
        yield started
    finally:
        if started:
            _discard_early()


def _discard_early() -> None:
    global _early
    with _early_lock:
        early, _early = _early, None
    if early is None:
        return
    early.ready.wait()
    if early.error is None:
        import ray

        ray.shutdown()
    early.release()


def _take_early(settings: RaySettings) -> _EarlyStart | None:
    """Wait for an early start (if any); it when it started the Ray ``settings`` ask for (the
    caller releases it after ``ray.shutdown``)."""
    global _early
    with _early_lock:
        early, _early = _early, None
    if early is None:
        return None
    early.ready.wait()
    if early.error is not None:
        raise early.error
    if early.settings != settings:  # started for other settings: not this session's Ray
        import ray

        ray.shutdown()
        early.release()
        return None
    if threading.current_thread() is threading.main_thread():
        _sigterm_exits()  # what ray.init does in the main thread, and could not in the background
    return early


def _sigterm_exits() -> None:
    """SIGTERM ends the process by ``sys.exit`` (exit handlers run), as ``ray.init`` sets it."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        sys.exit(signum)

    signal.signal(signal.SIGTERM, handler)


def _prepare_environment(settings: RaySettings) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train V2's controller takes a worker's report when it polls, every 2 s by default, and
    # a worker's next report waits for that: training that reports more often (a block of
    # boosting rounds takes ~0.3 s on the flights data) would wait up to 2 s per report. Local Ray
    # processes inherit this; a cluster's controller takes it from its own environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")
    address = settings.address or ""
    if not address or address.split(":")[0] in ("127.0.0.1", "localhost"):
        # Kept on loopback: Ray rewrites a node address of 127.0.0.1 to the machine's address
        # (Ray issue #59110) unless this is set, and its GCS, raylet, workers and agents then
        # listen on every interface. Ray reads it when it is imported, so it is set first.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


class _NotMainThread(logging.Filter):
    """Drop Ray's warning that a ``ray.init`` outside the main thread sets no SIGTERM handler
    (``_take_early`` sets it, in the main thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _init(settings: RaySettings, in_thread: bool = False) -> None:
    """``ray.init`` for ``settings``: connect to the cluster, or start a local Ray tied to
    this process's lifetime (``core.lifetime``)."""
    _prepare_environment(settings)
    import ray

    if not settings.address:
        from compute.ray_compat import keep_on_loopback

        keep_on_loopback()  # Ray was imported before this session set the variable: apply it all the same
    quiet = _NotMainThread()
    worker_log = logging.getLogger("ray._private.worker")
    if in_thread:
        worker_log.addFilter(quiet)
    try:
        if settings.address:
            log.info("connecting to Ray cluster %s", settings.address)
            ray.init(address=settings.address, logging_level=logging.WARNING, log_to_driver=False)
            return
        from core.lifetime import descendants, marked, new_descendants, tie

        before = descendants()
        with marked():  # the agents the raylet starts are marked too: they end with us, re-parented or not
            ray.init(
                address="local",  # always a new local Ray, never a cluster found on this machine
                num_cpus=settings.num_cpus,
                object_store_memory=settings.object_store_memory,
                include_dashboard=settings.include_dashboard,
                dashboard_host=settings.dashboard_host,
                # With the node on 127.0.0.1 Ray's gRPC servers and agents bind to loopback only.
                _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        tie(new_descendants(before))  # GCS, raylet, dashboard, agents: they end with this process
    finally:
        worker_log.removeFilter(quiet)


@contextmanager
def ray_session(settings: RaySettings) -> Iterator[dict[str, Any]]:
    """``ray.init`` for the configured cluster, shut down on exit; yields its resources.

    No address: a local Ray sized by ``num_cpus`` with an explicit object store, every process
    listening on 127.0.0.1 only (dashboard, if any, too). An address: that cluster (``host:port`` of a head started with
    ``ray start --head``, or ``ray://host:10001``); nothing is started here. A session opened
    by the caller is reused and left open; one begun by ``start_early`` is waited for and owned.
    """
    early = _take_early(settings)
    if early is None:
        _prepare_environment(settings)
        import ray

        if ray.is_initialized():
            yield ray.cluster_resources()
            return
        _init(settings)
    import ray

    try:
        resources = ray.cluster_resources()
        log.info("Ray ready: %s CPUs on %d node(s)", resources.get("CPU", 0), len(ray.nodes()))
        yield resources
    finally:
        ray.shutdown()
        if early is not None:
            early.release()
