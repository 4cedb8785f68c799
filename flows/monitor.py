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

import sys
from dataclasses import asdict
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from core.contract import load_contract
from core.settings import get_settings
from flows._runtime import lake_for, main, model_name_for, run_started


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
    """Wires: the champion -> its reference inputs (lineage) and the live window -> drift and
    live performance -> the events due (cool-down) -> Evidently reports, summary, gauges. What
    is decided is ``monitoring.decisions``'."""
    from tasks import monitor as t

    run_started()
    settings, config = get_settings(), get_settings().monitor
    contract = load_contract(params.dataset)
    lake = lake_for(settings, params.smoke_test)
    model_name = model_name_for(contract.name, params.smoke_test)
    how = t.plan(config, params.method, params.window_rows, params.drift_share, params.cooldown_s)
    champion = t.champion_task(settings.tracking_uri, model_name)
    reference = t.reference_task(lake, contract, champion, config.reference_rows)
    window = t.live_task(lake, contract, champion.stats, how.window_rows)
    drift = t.drift_task(reference, window.inputs, contract, how.thresholds, how.method)
    get_run_logger().info("drift (%s, %d live rows from %s to %s): %s", how.method, len(window.inputs),
                          window.first_ts, window.last_ts, drift.reason)
    registered = t.registered_task(settings.tracking_uri, model_name, window, champion.version)
    performance, snapshots = t.performance_task(lake, contract, registered, config.performance_tolerance,
                                                config.min_feedback)
    # Events first: the retraining they trigger need not wait for the reports.
    events = t.events_task(model_name, contract.name, champion, drift, performance, len(window.inputs),
                           t.Cooldown.of(settings.shared, model_name, how.cooldown_s))
    report = t.reports_task(settings.shared, t.evidently_workspace(settings.shared, config.evidently_url),
                            model_name, reference, window, contract, drift, how.thresholds, snapshots)
    t.summary_task(model_name, champion, drift, performance)
    if config.pushgateway:
        t.push_task(config.pushgateway, "flywheel_monitor", t.gauges(drift, performance, len(window.inputs)),
                    {"model_name": model_name})
    return MonitorResult(model_name=model_name, champion_version=champion.version,
                         reference_feature_version=champion.feature_version,
                         drift={k: v for k, v in drift.as_dict().items() if k != "details"},
                         performance=[asdict(p) for p in performance],
                         report=str(report) if report else None, events=events)


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
