"""Prefect task wrappers around the service's local control (``serving.control``): start,
find, reload, status and stop, with the names, retries and cache policies a run shows."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from serving.control import (  # noqa: F401 - the deploy flow takes these from here
    Served,
    port_for,
    reload_service,
    running,
    serve_plan,
    service_status,
    start,
    state_file,
    stop,
)

# Results are not persisted: the state holds the admin token.
start_task = task(name="start service", cache_policy=NO_CACHE, persist_result=False)(start)
stop_task = task(name="stop service", cache_policy=NO_CACHE, persist_result=False)(stop)
reload_task = task(name="reload service", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE,
                   persist_result=False)(reload_service)
running_task = task(name="find service", cache_policy=NO_CACHE, persist_result=False)(running)
status_task = task(name="service status", cache_policy=NO_CACHE, persist_result=False)(service_status)
