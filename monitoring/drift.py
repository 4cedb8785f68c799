"""Drift between a reference sample and a window of live inputs: a check that returns a decision.

``detect_drift(reference, current, categorical, numeric, thresholds)`` scores every column
and decides: data drift when the share of drifted columns reaches ``thresholds.drift_share``.
A window smaller than ``thresholds.min_rows`` decides nothing (``drift is None``) and says so.

Two scorers give the per-column scores:
- ``psi`` (default): the population stability index, vectorized with numpy. Numeric columns
  are binned at the reference's quantiles (the reference is binned once); categorical columns
  compare category shares. A column drifts when its PSI reaches ``thresholds.psi``.
- ``evidently``: Evidently's ``DataDriftPreset`` (Wasserstein distance for numerics and
  Jensen-Shannon for categoricals above 1,000 rows), on at most ``thresholds.sample_rows`` rows
  of each side. This is what the monitor's HTML report shows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

EPSILON = 1e-4  # share floor in PSI: an empty bin on one side is not an infinite score


@dataclass(frozen=True)
class DriftThresholds:
    psi: float = 0.2  # a column drifts at PSI >= 0.2 (the usual "significant shift")
    drift_share: float = 0.3  # data drift when >= 30% of the columns drift
    min_rows: int = 500  # a smaller window decides nothing
    bins: int = 10
    sample_rows: int = 50_000  # Evidently: rows per side at most


@dataclass
class DriftResult:
    drift: bool | None  # None: the window is too small to judge
    share: float  # share of drifted columns
    scores: dict[str, float]
    drifted: list[str]
    rows_reference: int
    rows_current: int
    method: str
    reason: str
    prediction_score: float | None = None  # the same score on the model's outputs
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of two share vectors (same bins)."""
    r = np.maximum(reference, EPSILON)
    c = np.maximum(current, EPSILON)
    return float(np.sum((c - r) * np.log(c / r)))


def numeric_bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (missing values get a bin of their own)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.array([], dtype=float)
    return np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1]))


def numeric_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Shares per bin: len(edges) + 1 bins, then one for missing values."""
    finite = np.isfinite(values)
    counts = np.bincount(np.searchsorted(edges, values[finite], side="right"), minlength=len(edges) + 1)
    shares = np.append(counts, (~finite).sum()).astype(float)
    return shares / max(1, len(values))


def category_shares(reference: pd.Series, current: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Shares of the reference's categories, missing values as one more, and one for categories
    the reference never had."""
    import pandas as pd

    ref_codes, categories = pd.factorize(reference, use_na_sentinel=True)  # missing: -1
    known = len(categories)
    ref_codes = np.where(ref_codes < 0, known, ref_codes)
    cur_codes = pd.Index(categories).get_indexer(current)  # -1: unseen or missing
    cur_missing = pd.isna(current).to_numpy()
    cur_codes = np.where(cur_missing, known, np.where(cur_codes < 0, known + 1, cur_codes))
    size = known + 2
    ref_counts = np.bincount(ref_codes, minlength=size)
    cur_counts = np.bincount(cur_codes, minlength=size)
    return ref_counts / max(1, len(reference)), cur_counts / max(1, len(current))


def psi_scores(reference: pd.DataFrame, current: pd.DataFrame, categorical: list[str], numeric: list[str],
               bins: int = 10) -> dict[str, float]:
    scores = {}
    for column in numeric:
        ref = reference[column].to_numpy(dtype=float)
        edges = numeric_bins(ref, bins)
        scores[column] = psi(numeric_shares(ref, edges), numeric_shares(current[column].to_numpy(dtype=float), edges))
    for column in categorical:
        scores[column] = psi(*category_shares(reference[column], current[column]))
    return scores


def evidently_scores(reference: pd.DataFrame, current: pd.DataFrame, categorical: list[str],
                     numeric: list[str], sample_rows: int, seed: int = 0) -> tuple[dict[str, float], dict[str, bool], Any]:
    """Evidently's per-column drift scores and verdicts on at most ``sample_rows`` per side;
    also returns the evaluated snapshot (for its HTML report and the workspace)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    def sample(frame: pd.DataFrame) -> pd.DataFrame:
        part = frame[categorical + numeric]
        return part.sample(sample_rows, random_state=seed) if len(part) > sample_rows else part

    definition = DataDefinition(categorical_columns=categorical, numerical_columns=numeric)
    ref = Dataset.from_pandas(_for_evidently(sample(reference), categorical), data_definition=definition)
    cur = Dataset.from_pandas(_for_evidently(sample(current), categorical), data_definition=definition)
    snapshot = Report([DataDriftPreset(columns=categorical + numeric)]).run(cur, ref)
    scores: dict[str, float] = {}
    drifted: dict[str, bool] = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        column = config.get("column")
        if str(config.get("type", "")).endswith(":ValueDrift") and column:
            value, threshold = float(metric["value"]), float(config["threshold"])
            scores[column] = value
            # A p-value drifts below its threshold (small windows: K-S, chi-square); a distance
            # (Wasserstein, Jensen-Shannon) at or above it.
            is_p_value = "p_value" in str(config.get("method", ""))
            drifted[column] = value < threshold if is_p_value else value >= threshold
    return scores, drifted, snapshot


def _for_evidently(frame: pd.DataFrame, categorical: list[str]) -> pd.DataFrame:
    out = frame.copy()
    for column in categorical:
        out[column] = out[column].astype("string").fillna("<missing>").astype(str)
    return out


def detect_drift(reference: pd.DataFrame, current: pd.DataFrame, categorical: list[str], numeric: list[str],
                 thresholds: DriftThresholds = DriftThresholds(),
                 method: Literal["psi", "evidently"] = "psi", prediction_column: str | None = None) -> DriftResult:
    """Score each feature column (and the predictions, if named) and decide."""
    columns = categorical + numeric
    if len(current) < thresholds.min_rows or len(reference) < thresholds.min_rows:
        return DriftResult(None, 0.0, {}, [], len(reference), len(current), method,
                           f"too few rows to judge: {len(current):,} live and {len(reference):,} reference rows, "
                           f"at least {thresholds.min_rows:,} of each needed")
    details: dict[str, Any] = {}
    if method == "psi":
        scores = psi_scores(reference, current, categorical, numeric, thresholds.bins)
        drifted = [c for c in columns if scores[c] >= thresholds.psi]
        rule = f"PSI >= {thresholds.psi}"
    else:
        scores, verdicts, snapshot = evidently_scores(reference, current, categorical, numeric,
                                                      thresholds.sample_rows)
        drifted = [c for c in columns if verdicts.get(c)]
        details["snapshot"] = snapshot
        rule = "Evidently's per-column tests"
    share = len(drifted) / max(1, len(columns))
    prediction_score = None
    if prediction_column and prediction_column in reference and prediction_column in current:
        ref = reference[prediction_column].to_numpy(dtype=float)
        edges = numeric_bins(ref, thresholds.bins)
        prediction_score = psi(numeric_shares(ref, edges),
                               numeric_shares(current[prediction_column].to_numpy(dtype=float), edges))
    drift = share >= thresholds.drift_share
    reason = (f"{len(drifted)} of {len(columns)} columns drifted ({share:.0%}, {rule}); "
              f"data drift {'detected' if drift else 'not detected'} at a share of {thresholds.drift_share:.0%}")
    if drifted:
        top = sorted(drifted, key=lambda c: -scores[c])[:5]
        reason += ": " + ", ".join(f"{c} {scores[c]:.3f}" for c in top)
    return DriftResult(drift, share, {c: float(v) if math.isfinite(v) else float("inf") for c, v in scores.items()},
                       drifted, len(reference), len(current), method, reason, prediction_score, details)
