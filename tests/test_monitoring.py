"""Drift detection: a check that returns a decision, with PSI (numpy) and Evidently."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitoring.drift import DriftThresholds, detect_drift, psi_scores


def frames(n: int, shift: float = 0.0, flip: float = 0.5, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "carrier": rng.choice(["AA", "UA", "DL"], n, p=[flip, (1 - flip) / 2, (1 - flip) / 2]),
        "origin": rng.choice(["EWR", "JFK", "LGA"], n),
        "temp": rng.normal(50 + shift * 20, 10, n),
        "distance": rng.lognormal(6.5, 0.6, n),
        "score": rng.beta(2, 5 + shift, n),
    })


CATEGORICAL, NUMERIC = ["carrier", "origin"], ["temp", "distance"]


@pytest.mark.parametrize("method", ["psi", "evidently"])
def test_drift_is_found_where_the_data_moved_and_not_where_it_did_not(method):
    reference = frames(20_000, seed=1)
    same = detect_drift(reference, frames(5_000, seed=2), CATEGORICAL, NUMERIC, method=method,
                        prediction_column="score")
    assert same.drift is False and same.drifted == [], same.reason
    moved = detect_drift(reference, frames(5_000, shift=1.5, flip=0.9, seed=3), CATEGORICAL, NUMERIC,
                         method=method, prediction_column="score")
    assert moved.drift is True and set(moved.drifted) == {"carrier", "temp"}, moved.reason
    assert moved.share == 0.5 and "carrier" in moved.reason and "temp" in moved.reason
    assert moved.scores["temp"] > same.scores["temp"]
    assert moved.prediction_score is not None and moved.prediction_score > same.prediction_score


def test_a_window_too_small_decides_nothing_and_says_so():
    result = detect_drift(frames(10_000), frames(120, shift=3), CATEGORICAL, NUMERIC,
                          DriftThresholds(min_rows=500))
    assert result.drift is None and result.drifted == []
    assert "too few rows" in result.reason and "120" in result.reason


def test_psi_handles_missing_values_unseen_categories_and_constant_columns():
    reference = pd.DataFrame({"c": ["a"] * 900 + [None] * 100, "x": [1.0] * 1000})
    current = pd.DataFrame({"c": ["b"] * 500 + ["a"] * 500, "x": [np.nan] * 500 + [1.0] * 500})
    scores = psi_scores(reference, current, ["c"], ["x"])
    assert scores["c"] > 1 and scores["x"] > 1  # an unseen category; half the values missing
    assert psi_scores(reference, reference, ["c"], ["x"]) == {"c": 0.0, "x": 0.0}


def test_sampling_keeps_the_decision():
    """Evidently on a 20,000-row sample of each side decides as it does on all rows."""
    reference, moved = frames(200_000, seed=4), frames(200_000, shift=0.8, flip=0.7, seed=5)
    full = detect_drift(reference, moved, CATEGORICAL, NUMERIC, DriftThresholds(sample_rows=10**9),
                        method="evidently")
    sampled = detect_drift(reference, moved, CATEGORICAL, NUMERIC, DriftThresholds(sample_rows=20_000),
                           method="evidently")
    assert (sampled.drift, sampled.drifted) == (full.drift, full.drifted)
    assert all(abs(sampled.scores[c] - full.scores[c]) < 0.02 for c in full.scores)


def test_live_performance_is_evidentlys_report_and_agrees_with_sklearn():
    from sklearn.metrics import roc_auc_score, root_mean_squared_error

    from monitoring.live import evidently_metric

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 2000).astype(float)
    part = pd.DataFrame({"label": labels, "score": np.clip(labels * 0.3 + rng.random(2000) * 0.7, 0, 1)})
    value, snapshot = evidently_metric(part, classification=True)
    assert value == pytest.approx(roc_auc_score(part["label"], part["score"]), abs=1e-9)
    assert "RocAuc" in snapshot.json()
    regression = pd.DataFrame({"label": rng.normal(size=500)})
    regression["score"] = regression["label"] + rng.normal(scale=0.5, size=500)
    value, _ = evidently_metric(regression, classification=False)
    assert value == pytest.approx(root_mean_squared_error(regression["label"], regression["score"]), rel=1e-6)
