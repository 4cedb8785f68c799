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

    No address: a ``LocalCluster`` on 127.0.0.1 (threads in this process unless
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
    options: dict[str, Any] = {}
    if settings.processes:
        options["host"] = "127.0.0.1"  # workers in other processes: loopback only
    # (With threads the scheduler is in-process, inproc://, and opens no port.)
    if settings.dashboard_address:
        options["dashboard_address"] = settings.dashboard_address
    else:
        options["scheduler_kwargs"] = {"dashboard": False}
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
             client.dashboard_link if settings.dashboard_address else "off")
    try:
        yield client
    finally:
        client.close()
        cluster.close()
