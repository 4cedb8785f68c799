"""Monitor: drift of live inputs and predictions, and live performance on ground truth.

``python -m flows.monitor`` compares the latest window of served predictions (the prediction
log the service writes) with a sample of the champion's training data, in the model's input
space; scores every feature and the predictions (PSI, or Evidently's tests with
``--method evidently``) and decides; computes each variant's metric on the predictions that
received feedback and compares it with the metric recorded at registration. It writes an
Evidently HTML report (a Prefect artifact links it), adds the run to the Evidently workspace
(``evidently ui --workspace <home>/evidently``), pushes gauges to a Pushgateway when
``monitor.pushgateway`` is set, and emits ``flywheel.drift.detected`` /
``flywheel.performance.degraded`` (at most once per ``monitor.cooldown_s``), which the
retraining automation listens to. A window too small to judge decides nothing and says so.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from pydantic import BaseModel, Field

from core import storage
from core.contract import load_contract
from core.registry import CHAMPION, Registry
from core.settings import get_settings
from flows._runtime import artifact_key, lake_for, main, model_name_for, run_started


class MonitorParams(BaseModel):
    """Check live traffic for drift and degrading performance; emit events the retraining listens to."""

    dataset: str = Field("flights", description="Dataset whose served model is monitored.")
    smoke_test: bool = Field(False, description="The smoke-test model and lake.")
    method: Literal["psi", "evidently"] | None = Field(None, description="Drift scorer (default: settings monitor.method).")
    window_rows: int | None = Field(None, ge=1, description="Latest served predictions to judge (default: settings).")
    drift_share: float | None = Field(None, gt=0, le=1, description="Data drift when this share of columns drifts "
                                      "(default: settings monitor.drift_share).")
    cooldown_s: float | None = Field(None, ge=0, description="At most one drift (or performance) event per this "
                                     "many seconds (default: settings monitor.cooldown_s).")


class MonitorResult(BaseModel):
    model_name: str
    champion_version: str
    reference_feature_version: int
    drift: dict[str, Any]
    performance: list[dict[str, Any]]
    report: str | None
    events: list[str]


@flow(name="monitor", log_prints=True)
def monitor(params: MonitorParams = MonitorParams()) -> MonitorResult:
    """Load reference and live window, detect drift, measure live performance, report, alert."""
    from prefect.events import emit_event

    from core.registry import load_version
    from monitoring.drift import DriftThresholds, detect_drift
    from tasks.monitor import (
        drift_task,
        live_task,
        performance_task,
        push_task,
        reference_scores,
        reference_task,
        report_task,
        workspace_task,
    )

    run_started()
    logger = get_run_logger()
    settings = get_settings()
    config = settings.monitor
    contract = load_contract(params.dataset)
    lake = lake_for(settings, params.smoke_test)
    model_name = model_name_for(contract.name, params.smoke_test)
    registry = Registry.for_uri(settings.tracking_uri)
    registry.require(model_name)
    version = registry.version_by_alias(model_name, CHAMPION)
    if version is None:
        raise LookupError(f"{model_name} has no champion to monitor")
    champion = load_version(registry, model_name, version)
    feature_version = int(champion.tags["flywheel.feature_version"])
    method = params.method or config.method
    thresholds = DriftThresholds(psi=config.psi, drift_share=params.drift_share or config.drift_share, min_rows=config.min_rows,
                                 sample_rows=config.sample_rows)

    reference: Any = reference_task(lake, contract, feature_version, champion.stats, config.reference_rows)
    reference["score"] = reference_scores(champion.model, reference, contract, champion.stats)
    window = live_task(lake, contract, champion.stats, params.window_rows or config.window_rows)
    live = window.inputs
    categorical, numeric = list(contract.features.categorical), list(contract.features.numeric)
    drift = drift_task(reference, live, categorical, numeric, thresholds, method)
    logger.info("drift (%s, %d live rows from %s to %s): %s", method, len(live), window.first_ts,
                window.last_ts, drift.reason)

    registered = {}
    for seen in {str(v) for v in live.get("model_version", [])} | {champion.version}:
        tags = registry.client.get_model_version(model_name, seen).tags
        registered[seen] = json.loads(tags.get("flywheel.metrics", "{}"))
    performance, performance_snapshots = performance_task(lake, contract, registered, config.performance_tolerance,
                                                          config.min_feedback)
    for item in performance:
        logger.info("performance of %s v%s on %d predictions with feedback: %s", item.variant, item.model_version,
                    item.rows, item.reason)

    # Events first: the retraining they trigger need not wait for the report.
    events = []
    resource = {"prefect.resource.id": f"flywheel.model.{model_name}", "prefect.resource.name": model_name}
    cooldown_s = config.cooldown_s if params.cooldown_s is None else params.cooldown_s
    cooldown = _Cooldown(storage.join(settings.shared, "monitor", f"{model_name}.json"), cooldown_s)
    if drift.drift and cooldown.ready("drift"):
        emit_event("flywheel.drift.detected", resource=resource,
                   payload={"dataset": contract.name, "share": drift.share, "drifted": drift.drifted,
                            "scores": drift.scores, "prediction_psi": drift.prediction_score, "reference_feature_version": feature_version,
                            "champion_version": champion.version, "live_rows": len(live), "method": method})
        events.append("flywheel.drift.detected")
    degraded = [p for p in performance if p.degraded]
    if degraded and cooldown.ready("performance"):
        emit_event("flywheel.performance.degraded", resource=resource,
                   payload={"dataset": contract.name, "degraded": [asdict(p) for p in degraded]})
        events.append("flywheel.performance.degraded")
    if (drift.drift or degraded) and not events:
        logger.info("an event was emitted less than %s s ago: cooling down", cooldown_s)

    report_path = None
    # The Evidently workspace: a service when configured, else a folder under the shared root
    # when that is a folder (Evidently's local workspace cannot live on an object store).
    workspace = config.evidently_url or (None if storage.is_remote(settings.shared)
                                         else storage.join(settings.shared, "evidently"))
    if workspace is None:
        logger.info("no Evidently workspace: shared_root %s is an object store and monitor.evidently_url is "
                    "empty (reports still go to %s)", settings.shared, storage.join(settings.shared, "reports"))
    if drift.drift is not None:
        # The HTML report is Evidently's, whatever scored the decision (on a sample).
        snapshot = drift.details.get("snapshot") or detect_drift(
            reference, live, categorical, numeric, thresholds, method="evidently").details["snapshot"]
        stamp = time.strftime("%Y%m%dT%H%M%S")
        report_path = report_task(snapshot, storage.join(settings.shared, "reports", "drift",
                                                         f"{model_name}-{stamp}.html"))
        if workspace:
            workspace_task(workspace, model_name, snapshot)
        create_link_artifact(storage.link(report_path), link_text=f"drift report {stamp}",
                             key=artifact_key("drift", model_name),
                             description=f"Evidently drift report: {drift.reason}")
    for judged, snapshot in performance_snapshots.items():
        # Evidently's classification (or regression) report of each variant judged: the HTML,
        # and the workspace, where the Evidently UI shows live performance over time.
        stamp = time.strftime("%Y%m%dT%H%M%S")
        slug = judged.replace(" ", "-")
        path = report_task(snapshot, storage.join(settings.shared, "reports", "performance",
                                                  f"{model_name}-{slug}-{stamp}.html"))
        if workspace:
            workspace_task(workspace, model_name, snapshot)
        create_link_artifact(storage.link(path), link_text=f"performance report {judged} {stamp}",
                             key=artifact_key("performance", model_name, slug),
                             description=f"Evidently report of {judged} on live ground truth")
    create_markdown_artifact(_summary(model_name, champion.version, feature_version, drift, performance),
                             key=artifact_key("monitor", model_name), description="Drift and live performance")

    gauges = {"flywheel_drift_share": drift.share, "flywheel_drift_detected": float(bool(drift.drift)),
              "flywheel_monitor_live_rows": float(len(live)),
              "flywheel_prediction_drift_psi": float(drift.prediction_score or 0.0),
              "flywheel_monitor_last_run_timestamp_seconds": time.time()}
    for item in performance:
        if item.live is not None:
            gauges[f"flywheel_live_{item.metric}_{item.variant}"] = item.live
    if config.pushgateway:
        push_task(config.pushgateway, "flywheel_monitor", gauges, {"model_name": model_name})

    return MonitorResult(model_name=model_name, champion_version=champion.version,
                         reference_feature_version=feature_version,
                         drift={k: v for k, v in drift.as_dict().items() if k != "details"},
                         performance=[asdict(p) for p in performance],
                         report=str(report_path) if report_path else None, events=events)


class _Cooldown:
    """When each kind of event was last emitted, in a small JSON file under the shared root
    (monitor runs on any machine see the same)."""

    def __init__(self, uri: str, seconds: float):
        self.uri, self.seconds = uri, seconds

    def ready(self, kind: str) -> bool:
        try:
            last = json.loads(storage.read_bytes(self.uri) or b"{}")
        except ValueError:
            last = {}
        now = time.time()
        if now - float(last.get(kind, 0)) < self.seconds:
            return False
        last[kind] = now
        storage.write_bytes(self.uri, json.dumps(last).encode())
        return True


def _summary(model_name: str, version: str, feature_version: int, drift: Any, performance: list[Any]) -> str:
    lines = [f"# {model_name}: champion v{version}", "", f"Reference: feature table version {feature_version} "
             f"(training split, {drift.rows_reference:,} rows); live window: {drift.rows_current:,} rows.", "",
             f"**Drift ({drift.method})**: {drift.reason}", ""]
    if drift.scores:
        lines += ["| column | score | drifted |", "|---|---|---|"]
        lines += [f"| {c} | {s:.4f} | {'yes' if c in drift.drifted else ''} |"
                  for c, s in sorted(drift.scores.items(), key=lambda item: -item[1])]
    lines += ["", "**Live performance**", ""]
    lines += [f"- {p.variant} v{p.model_version}: {p.reason}" for p in performance] or ["- no feedback yet"]
    return "\n".join(lines)


def report(result: MonitorResult) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"{result.model_name} (champion v{result.champion_version}): {result.drift['reason']}")
    for item in result.performance:
        console.print(f"  {item['variant']} v{item['model_version']}: {item['reason']}")
    if result.report:
        console.print(f"  report: {result.report}")
    console.print(f"  events: {', '.join(result.events) or 'none'}")


if __name__ == "__main__":
    sys.exit(main(monitor, MonitorParams, sys.argv[1:], "python -m flows.monitor", report))
