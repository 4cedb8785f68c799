"""What the monitor decides, as plain functions: the thresholds a run judges by, which events it
emits (under a cool-down), the gauges it pushes, where its Evidently runs go, and the summary a
person reads. ``flows.monitor`` wires them; ``tests/test_monitor_decisions.py`` pins them."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from core import storage
from core.events import DRIFT_DETECTED, PERFORMANCE_DEGRADED
from core.settings import MonitorSettings
from monitoring.drift import DriftResult, DriftThresholds
from monitoring.live import Performance


@dataclass(frozen=True)
class MonitorPlan:
    """How one monitor run judges: settings, with the run's own parameters over them."""

    method: str
    thresholds: DriftThresholds
    window_rows: int
    cooldown_s: float


def plan(config: MonitorSettings, method: str | None = None, window_rows: int | None = None,
         drift_share: float | None = None, cooldown_s: float | None = None) -> MonitorPlan:
    return MonitorPlan(
        method=method or config.method,
        thresholds=DriftThresholds(psi=config.psi, drift_share=drift_share or config.drift_share,
                                   min_rows=config.min_rows, sample_rows=config.sample_rows),
        window_rows=window_rows or config.window_rows,
        cooldown_s=config.cooldown_s if cooldown_s is None else cooldown_s)


class Cooldown:
    """When each kind of event was last emitted, in a small JSON file under the shared root
    (monitor runs on any machine see the same)."""

    def __init__(self, uri: str, seconds: float):
        self.uri, self.seconds = uri, seconds

    @classmethod
    def of(cls, shared: str, model_name: str, seconds: float) -> Cooldown:
        return cls(storage.join(shared, "monitor", f"{model_name}.json"), seconds)

    def ready(self, kind: str, now: float | None = None) -> bool:
        """True (and the time recorded) when no ``kind`` event went out in the last ``seconds``."""
        try:
            last = json.loads(storage.read_bytes(self.uri) or b"{}")
        except ValueError:
            last = {}
        now = time.time() if now is None else now
        if now - float(last.get(kind, 0)) < self.seconds:
            return False
        last[kind] = now
        storage.write_bytes(self.uri, json.dumps(last).encode())
        return True


@dataclass(frozen=True)
class Event:
    name: str
    payload: dict[str, Any]


def events_due(dataset: str, champion_version: str, feature_version: int, drift: DriftResult,
               performance: list[Performance], live_rows: int, cooldown: Cooldown) -> tuple[list[Event], str | None]:
    """The events to emit: drift when the window drifted, degraded performance when a variant's
    live metric fell below its registration's; each at most once per cool-down. Returns them
    and, when something was found but the cool-down held it back, why nothing went out."""
    events = []
    if drift.drift and cooldown.ready("drift"):
        events.append(Event(DRIFT_DETECTED, {
            "dataset": dataset, "share": drift.share, "drifted": drift.drifted, "scores": drift.scores,
            "prediction_psi": drift.prediction_score, "reference_feature_version": feature_version,
            "champion_version": champion_version, "live_rows": live_rows, "method": drift.method}))
    degraded = [p for p in performance if p.degraded]
    if degraded and cooldown.ready("performance"):
        events.append(Event(PERFORMANCE_DEGRADED, {"dataset": dataset, "degraded": [asdict(p) for p in degraded]}))
    held = None
    if (drift.drift or degraded) and not events:
        held = f"an event was emitted less than {cooldown.seconds:g} s ago: cooling down"
    return events, held


def gauges(drift: DriftResult, performance: list[Performance], live_rows: int,
           now: float | None = None) -> dict[str, float]:
    """What the monitor pushes to the Pushgateway (the dashboards' drift and live panels)."""
    values = {"flywheel_drift_share": drift.share, "flywheel_drift_detected": float(bool(drift.drift)),
              "flywheel_monitor_live_rows": float(live_rows),
              "flywheel_prediction_drift_psi": float(drift.prediction_score or 0.0),
              "flywheel_monitor_last_run_timestamp_seconds": time.time() if now is None else now}
    for item in performance:
        if item.live is not None:
            values[f"flywheel_live_{item.metric}_{item.variant}"] = item.live
    return values


def evidently_workspace(shared: str, evidently_url: str | None) -> str | None:
    """Where monitoring runs go: the Evidently UI service when configured, else a folder under
    the shared root when that is a folder (Evidently's local workspace cannot live on an object
    store); None: reports only."""
    return evidently_url or (None if storage.is_remote(shared) else storage.join(shared, "evidently"))


def summary(model_name: str, version: str, feature_version: int, drift: DriftResult,
            performance: list[Performance]) -> str:
    """The run's Markdown summary (a Prefect artifact)."""
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
