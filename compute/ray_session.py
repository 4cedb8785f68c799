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

    No address: a local Ray sized by ``num_cpus`` with an explicit object store, dashboard
    (if any) on 127.0.0.1. An address: that cluster (``host:port`` of a head started with
    ``ray start --head``, or ``ray://host:10001``); nothing is started here. A session opened
    by the caller is reused and left open.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.address and settings.address.split(":")[0] in ("127.0.0.1", "localhost"):
        # A cluster kept on loopback (see compute.ray_cluster, Ray issue #59110). Ray reads
        # this when it is imported, so it is set first.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    if settings.address:
        log.info("connecting to Ray cluster %s", settings.address)
        ray.init(address=settings.address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(
            address="local",  # always a new local Ray, never a cluster found on this machine
            num_cpus=settings.num_cpus,
            object_store_memory=settings.object_store_memory,
            include_dashboard=settings.include_dashboard,
            dashboard_host=settings.dashboard_host,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    try:
        resources = ray.cluster_resources()
        log.info("Ray ready: %s CPUs on %d node(s)", resources.get("CPU", 0), len(ray.nodes()))
        yield resources
    finally:
        ray.shutdown()
