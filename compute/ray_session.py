"""Open Ray from settings: a local Ray by default, a cluster address when given."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.settings import RaySettings

log = logging.getLogger(__name__)


@contextmanager
def ray_session(settings: RaySettings) -> Iterator[dict[str, Any]]:
    """``ray.init`` for the configured cluster, shut down on exit; yields its resources.

    No address: a local Ray sized by ``num_cpus`` with an explicit object store, every process
    listening on 127.0.0.1 only (dashboard, if any, too). An address: that cluster (``host:port`` of a head started with
    ``ray start --head``, or ``ray://host:10001``); nothing is started here. A session opened
    by the caller is reused and left open.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train V2's controller takes a worker's report when it polls, every 2 s by default, and
    # a worker's next report waits for that: training that reports more often (a block of
    # boosting rounds takes ~0.3 s on the flights data) would wait up to 2 s per report. Local Ray
    # processes inherit this; a cluster's controller takes it from its own environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")
    address = settings.address or ""
    local = not address
    if local or address.split(":")[0] in ("127.0.0.1", "localhost"):
        # Kept on loopback: Ray rewrites a node address of 127.0.0.1 to the machine's address
        # (Ray issue #59110) unless this is set, and its GCS, raylet, workers and agents then
        # listen on every interface. Ray reads it when it is imported, so it is set first.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if local:
        from compute.ray_compat import keep_on_loopback

        keep_on_loopback()  # Ray was imported before this session set the variable: apply it all the same
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    if settings.address:
        log.info("connecting to Ray cluster %s", settings.address)
        ray.init(address=settings.address, logging_level=logging.WARNING, log_to_driver=False)
    else:
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
    try:
        resources = ray.cluster_resources()
        log.info("Ray ready: %s CPUs on %d node(s)", resources.get("CPU", 0), len(ray.nodes()))
        yield resources
    finally:
        ray.shutdown()
