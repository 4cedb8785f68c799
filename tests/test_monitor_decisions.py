"""What the monitor decides, without a service or a flow run: the thresholds of a run, the
events due under a cool-down, the gauges, where Evidently runs go, the summary."""

from __future__ import annotations

from core.settings import MonitorSettings
from monitoring.decisions import (
    DRIFT_DETECTED,
    PERFORMANCE_DEGRADED,
    Cooldown,
    events_due,
    evidently_workspace,
    gauges,
    plan,
    summary,
)
from monitoring.drift import DriftResult
from monitoring.live import Performance


def drift(found: bool | None) -> DriftResult:
    return DriftResult(drift=found, share=0.5 if found else 0.0, scores={"dest": 0.31, "hour": 0.02},
                       drifted=["dest"] if found else [], rows_reference=1000, rows_current=800, method="psi",
                       reason="1 of 2 columns drifted" if found else "no drift", prediction_score=0.12)


def performance(degraded: bool | None, variant: str = "champion", live: float | None = 0.61) -> Performance:
    return Performance(variant, "3", 400, "roc_auc", live, 0.70, degraded, "live roc_auc 0.61 vs 0.70")


def test_a_run_judges_by_the_settings_unless_its_parameters_say_otherwise():
    config = MonitorSettings()
    default = plan(config)
    assert (default.method, default.window_rows, default.cooldown_s) == ("psi", 20_000, 900.0)
    assert default.thresholds.drift_share == config.drift_share and default.thresholds.min_rows == config.min_rows
    own = plan(config, method="evidently", window_rows=5000, drift_share=0.5, cooldown_s=0)
    assert (own.method, own.window_rows, own.cooldown_s, own.thresholds.drift_share) == ("evidently", 5000, 0, 0.5)


def test_drift_and_degraded_performance_each_emit_once_per_cool_down(tmp_path):
    cooldown = Cooldown.of(str(tmp_path), "flywheel-flights", 900)
    events, held = events_due("flights", "3", 7, drift(True), [performance(True), performance(False, "challenger")],
                              800, cooldown)
    assert [e.name for e in events] == [DRIFT_DETECTED, PERFORMANCE_DEGRADED] and held is None
    assert events[0].payload["drifted"] == ["dest"] and events[0].payload["reference_feature_version"] == 7
    assert [d["variant"] for d in events[1].payload["degraded"]] == ["champion"]  # the degraded one only
    again, held = events_due("flights", "3", 7, drift(True), [performance(True)], 800, cooldown)
    assert again == [] and "cooling down" in (held or "")
    # The cool-down is kept under the shared root: another monitor run (another machine) sees it.
    assert not Cooldown.of(str(tmp_path), "flywheel-flights", 900).ready("drift")
    assert Cooldown.of(str(tmp_path), "flywheel-other", 900).ready("drift")


def test_nothing_found_or_too_little_to_judge_emits_nothing(tmp_path):
    cooldown = Cooldown.of(str(tmp_path), "m", 0)
    assert events_due("d", "1", 1, drift(False), [performance(False)], 800, cooldown) == ([], None)
    assert events_due("d", "1", 1, drift(None), [performance(None, live=None)], 10, cooldown) == ([], None)


def test_a_zero_cool_down_emits_every_time(tmp_path):
    cooldown = Cooldown.of(str(tmp_path), "m", 0)
    for _ in range(3):
        events, _ = events_due("d", "1", 1, drift(True), [], 800, cooldown)
        assert [e.name for e in events] == [DRIFT_DETECTED]


def test_gauges_name_each_judged_variant():
    values = gauges(drift(True), [performance(True), performance(None, "challenger", live=None)], 800, now=5.0)
    assert values == {"flywheel_drift_share": 0.5, "flywheel_drift_detected": 1.0, "flywheel_monitor_live_rows": 800.0,
                      "flywheel_prediction_drift_psi": 0.12, "flywheel_monitor_last_run_timestamp_seconds": 5.0,
                      "flywheel_live_roc_auc_champion": 0.61}


def test_evidently_runs_go_to_the_service_else_a_folder_never_an_object_store(tmp_path):
    assert evidently_workspace(str(tmp_path), "http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert evidently_workspace(str(tmp_path), None) == str(tmp_path / "evidently")
    assert evidently_workspace("s3://bucket/shared", None) is None


def test_the_summary_ranks_columns_and_says_when_there_is_no_feedback():
    text = summary("flywheel-flights", "3", 7, drift(True), [])
    assert text.index("| dest | 0.3100 | yes |") < text.index("| hour | 0.0200 |  |")
    assert "feature table version 7" in text and "- no feedback yet" in text
