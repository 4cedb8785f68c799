"""Open Dask from settings: a local cluster by default, a scheduler address when given."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.settings import DaskSettings

log = logging.getLogger(__name__)


@contextmanager
def dask_client(settings: DaskSettings) -> Iterator[Any]:
    """A ``distributed.Client`` for the configured cluster, closed on exit.

    No address: a ``LocalCluster`` listening on 127.0.0.1 only (threads in this process unless
    ``processes`` is set, since on one machine threads avoid moving partitions between
    processes). An address: that scheduler, and nothing is started here.
    """
    from dask.distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)
    if settings.address:
        log.info("connecting to Dask scheduler %s", settings.address)
        client = Client(settings.address, timeout="30s", set_as_default=False)
        try:
            yield client
        finally:
            client.close()
        return
    # Every listener on loopback. The scheduler and each worker always start an HTTP server
    # (health, metrics; the dashboard when enabled), on all interfaces unless told otherwise:
    # the scheduler on :8787 even with the dashboard off.
    dashboard = settings.dashboard_address
    options: dict[str, Any] = {
        "dashboard_address": None,
        "worker_dashboard_address": "127.0.0.1:0",
        "scheduler_kwargs": {"dashboard": bool(dashboard),
                             "dashboard_address": dashboard or "127.0.0.1:0"},
    }
    if settings.processes:
        options["host"] = "127.0.0.1"  # scheduler and worker ports; threads use inproc://
    cluster = LocalCluster(
        n_workers=settings.n_workers,
        threads_per_worker=settings.threads_per_worker,
        processes=settings.processes,
        silence_logs=logging.WARNING,
        **options,
    )
    client = Client(cluster, set_as_default=False)
    log.info("started local Dask cluster: %d worker(s), %s threads, dashboard %s",
             len(cluster.workers), sum(client.nthreads().values()),
             client.dashboard_link if dashboard else "off")
    try:
        yield client
    finally:
        client.close()
        cluster.close()
