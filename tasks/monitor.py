"""Prefect tasks of the monitor flow, around ``monitoring.live`` (what is read and measured)
and ``monitoring.decisions`` (what is decided). The flow imports its helpers from here."""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from core import storage
from core.artifacts import artifact_key
from core.contract import DatasetContract
from core.events import model_resource
from core.lake import Lake
from core.registry import CHAMPION, LoadedVersion, Registry, load_alias, registered_metrics
from monitoring.decisions import Cooldown, events_due, evidently_workspace, gauges, plan, summary
from monitoring.drift import DriftResult, DriftThresholds
from monitoring.live import (
    Performance,
    Window,
    add_to_workspace,
    drift,
    drift_report,
    live_inputs,
    live_performance,
    push_gauges,
    scored_reference,
    write_report,
)

# The flow takes these from here (flows import tasks and core only).
__all__ = ["Cooldown", "evidently_workspace", "gauges", "plan", "push_gauges"]

log = logging.getLogger(__name__)


def champion(tracking_uri: str, model_name: str) -> LoadedVersion:
    """The registered champion, loaded (its model, feature statistics and lineage)."""
    registry = Registry.for_uri(tracking_uri)
    registry.require(model_name)
    return load_alias(registry, model_name, CHAMPION)


def metrics_at_registration(tracking_uri: str, model_name: str, window: Window,
                            champion_version: str) -> dict[str, dict[str, float]]:
    """The registration metrics of the champion and of every version seen in the window."""
    seen = {str(v) for v in window.inputs.get("model_version", [])} | {champion_version}
    return registered_metrics(Registry.for_uri(tracking_uri), model_name, seen)


def judge_performance(lake: Lake, contract: DatasetContract, registered: dict[str, dict[str, float]],
                      tolerance: float, min_rows: int) -> tuple[list[Performance], dict[str, Any]]:
    performance, snapshots = live_performance(lake, contract, registered, tolerance, min_rows)
    for item in performance:
        log.info("performance of %s v%s on %d predictions with feedback: %s", item.variant, item.model_version,
                 item.rows, item.reason)
    return performance, snapshots


def emit_due(model_name: str, dataset: str, champion: LoadedVersion, drift: DriftResult,
             performance: list[Performance], live_rows: int, cooldown: Cooldown) -> list[str]:
    """Emit the events ``monitoring.decisions.events_due`` says are due; their names."""
    from prefect.events import emit_event

    events, held = events_due(dataset, champion.version, champion.feature_version, drift, performance, live_rows,
                              cooldown)
    resource = model_resource(model_name)
    for event in events:
        emit_event(event.name, resource=resource, payload=event.payload)
    if held:
        log.info(held)
    return [event.name for event in events]


def publish_reports(shared: str, workspace: str | None, model_name: str, reference: Any, window: Window,
                    contract: DatasetContract, result: DriftResult, thresholds: DriftThresholds,
                    performance_snapshots: dict[str, Any]) -> str | None:
    """Evidently's HTML reports (drift when it was judged, and each variant's live performance)
    under the shared root, each added to the workspace and linked from a Prefect artifact.
    Returns the drift report's location."""
    from prefect.artifacts import create_link_artifact

    stamp = time.strftime("%Y%m%dT%H%M%S")
    if workspace is None:
        log.info("no Evidently workspace: shared_root %s is an object store and monitor.evidently_url is empty "
                 "(reports still go to %s)", shared, storage.join(shared, "reports"))
    drift_path = None
    published = []
    if result.drift is not None:
        snapshot = drift_report(reference, window.inputs, contract, result, thresholds)
        drift_path = report_task(snapshot, storage.join(shared, "reports", "drift", f"{model_name}-{stamp}.html"))
        published.append((drift_path, snapshot, f"drift report {stamp}", artifact_key("drift", model_name),
                          f"Evidently drift report: {result.reason}"))
    for judged, snapshot in performance_snapshots.items():
        # Each variant judged: its classification (or regression) report; the Evidently UI
        # shows live performance over time from the workspace.
        slug = judged.replace(" ", "-")
        path = report_task(snapshot, storage.join(shared, "reports", "performance", f"{model_name}-{slug}-{stamp}.html"))
        published.append((path, snapshot, f"performance report {judged} {stamp}",
                          artifact_key("performance", model_name, slug),
                          f"Evidently report of {judged} on live ground truth"))
    for path, snapshot, text, key, description in published:
        if workspace:
            workspace_task(workspace, model_name, snapshot)
        create_link_artifact(storage.link(path), link_text=text, key=key, description=description)
    return drift_path


def publish_summary(model_name: str, champion: LoadedVersion, result: DriftResult,
                    performance: list[Performance]) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(summary(model_name, champion.version, champion.feature_version, result, performance),
                             key=artifact_key("monitor", model_name), description="Drift and live performance")


champion_task = task(name="load champion", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)(champion)
reference_task = task(name="load reference inputs", cache_policy=NO_CACHE)(scored_reference)
live_task = task(name="load live window", cache_policy=NO_CACHE)(live_inputs)
drift_task = task(name="detect drift", cache_policy=NO_CACHE)(drift)
registered_task = task(name="metrics at registration", retries=2, retry_delay_seconds=2,
                       cache_policy=NO_CACHE)(metrics_at_registration)
performance_task = task(name="live performance", cache_policy=NO_CACHE)(judge_performance)
events_task = task(name="emit events", cache_policy=NO_CACHE)(emit_due)
report_task = task(name="write report", cache_policy=NO_CACHE)(write_report)
workspace_task = task(name="add to Evidently workspace", retries=2, retry_delay_seconds=1,
                      cache_policy=NO_CACHE)(add_to_workspace)
reports_task = task(name="publish reports", cache_policy=NO_CACHE)(publish_reports)
summary_task = task(name="publish summary", cache_policy=NO_CACHE)(publish_summary)
push_task = task(name="push gauges", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)(push_gauges)
