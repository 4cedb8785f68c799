"""Evaluation on the time-based test split: the candidate, two baselines, the champion."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.train import SplitArrays, TrainingData

log = logging.getLogger(__name__)


def classification_metrics(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import log_loss, precision_score, recall_score, roc_auc_score

    predicted = scores >= threshold
    return {
        "roc_auc": float(roc_auc_score(y, scores)),
        "log_loss": float(log_loss(y, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "precision": float(precision_score(y, predicted, zero_division=0)),
        "recall": float(recall_score(y, predicted, zero_division=0)),
        "threshold": float(threshold),
    }


def regression_metrics(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    return {"mae": float(mean_absolute_error(y, predicted)),
            "rmse": float(root_mean_squared_error(y, predicted)),
            "r2": float(r2_score(y, predicted))}


def best_threshold(y: np.ndarray, scores: np.ndarray) -> float:
    """The decision threshold with the best F1 on the validation split."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))]) if len(thresholds) else 0.5


@dataclass
class Scored:
    """One model's scores on validation and test, and its test metrics."""

    name: str
    validation: np.ndarray
    test: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)


def score(name: str, task: str, validation_scores: np.ndarray, test_scores: np.ndarray,
          data: TrainingData) -> Scored:
    y_val, y_test = data.splits["validation"].target, data.splits["test"].target
    if task == "classification":
        metrics = classification_metrics(y_test, test_scores, best_threshold(y_val, validation_scores))
    else:
        metrics = regression_metrics(y_test, test_scores)
    return Scored(name, validation_scores, test_scores, metrics)


def _design(split: SplitArrays, cardinalities: list[int]) -> Any:
    """One-hot categorical codes beside the numerics: the linear baseline's inputs."""
    from scipy import sparse

    offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]])
    rows = np.repeat(np.arange(len(split)), split.categorical.shape[1])
    cols = (split.categorical + offsets).ravel()
    onehot = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(split), int(sum(cardinalities))))
    return sparse.hstack([onehot, sparse.csr_matrix(split.numeric)]).tocsr()


@dataclass
class LinearBaseline:
    """A logistic (classification) or ridge (regression) model on one-hot categoricals and
    numerics; ``wide_init`` is the same model as weights for the network's wide part."""

    name: str
    model: Any
    wide_init: dict[str, Any]


def fit_linear(data: TrainingData) -> LinearBaseline:
    """Fit the linear baseline on the training split (deterministic: lbfgs / closed form)."""
    cards = data.spec_base()["cardinalities"]
    train = data.splits["train"]
    x_train = _design(train, cards)
    if data.task == "classification":
        from sklearn.linear_model import LogisticRegression

        model, name = LogisticRegression(max_iter=300, C=1.0).fit(x_train, train.target), "logistic"
    else:
        from sklearn.linear_model import Ridge

        model, name = Ridge(alpha=1.0).fit(x_train, train.target), "linear"
    coef = np.asarray(model.coef_, dtype=np.float32).ravel()
    offsets = np.concatenate([[0], np.cumsum(cards)])
    wide = {"categorical": [coef[offsets[i]:offsets[i + 1]] for i in range(len(cards))],
            "numeric": coef[offsets[-1]:], "intercept": float(np.ravel(model.intercept_)[0])}
    return LinearBaseline(name, model, wide)


def baselines(data: TrainingData, linear: LinearBaseline | None = None) -> list[Scored]:
    """The prior (rate or mean) predictor and the logistic/linear model on the same features."""
    cards = data.spec_base()["cardinalities"]
    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    prior = float(train.target.mean())
    out = [score("prior", data.task, np.full(len(val), prior), np.full(len(test), prior), data)]
    linear = linear or fit_linear(data)
    x_val, x_test = _design(val, cards), _design(test, cards)
    if data.task == "classification":
        val_scores, test_scores = linear.model.predict_proba(x_val)[:, 1], linear.model.predict_proba(x_test)[:, 1]
    else:
        val_scores, test_scores = linear.model.predict(x_val), linear.model.predict(x_test)
    out.append(score(linear.name, data.task, val_scores, test_scores, data))
    return out


def score_model(name: str, model: Any, data: TrainingData, splits: dict[str, SplitArrays] | None = None) -> Scored:
    from core.model import predict

    splits = splits or data.splits
    return score(name, data.task, predict(model, splits["validation"].categorical, splits["validation"].numeric),
                 predict(model, splits["test"].categorical, splits["test"].numeric), data)


PRIMARY = {"classification": ("roc_auc", "higher"), "regression": ("rmse", "lower")}


def beats(candidate: dict[str, float], other: dict[str, float], task: str, margin: float) -> bool:
    """Better than ``other`` by at least the margin (ROC AUC points, or relative RMSE)."""
    metric, direction = PRIMARY[task]
    if direction == "higher":
        return candidate[metric] >= other[metric] + margin
    return candidate[metric] <= other[metric] * (1 - margin)


def not_worse(candidate: dict[str, float], other: dict[str, float], task: str, margin: float) -> bool:
    """No worse than ``other`` by more than the margin (same units as ``beats``)."""
    metric, direction = PRIMARY[task]
    if direction == "higher":
        return candidate[metric] >= other[metric] - margin
    return candidate[metric] <= other[metric] * (1 + margin)


@dataclass
class Decision:
    register: bool
    reasons: list[str]


def gate(candidate: Scored, baselines: list[Scored], task: str, margin: float,
         champion: Scored | None = None) -> Decision:
    """Register (as challenger) only if the candidate beats every baseline by the margin and is
    not worse than the current champion, scored on the same test rows, by more than the
    margin. The reasons list every comparison, passed or not."""
    metric, _ = PRIMARY[task]
    reasons = []
    ok = True
    for other in baselines:
        won = beats(candidate.metrics, other.metrics, task, margin)
        ok &= won
        reasons.append(f"{metric} {candidate.metrics[metric]:.4f} vs {other.name} {other.metrics[metric]:.4f}: "
                       f"{'beats' if won else 'does not beat'} it by the margin {margin}")
    if champion is not None:
        held = not_worse(candidate.metrics, champion.metrics, task, margin)
        ok &= held
        verdict = "not worse than" if held else "worse than"
        reasons.append(f"{metric} {candidate.metrics[metric]:.4f} vs {champion.name} "
                       f"{champion.metrics[metric]:.4f}: {verdict} the champion by more than the margin {margin}")
    else:
        reasons.append("no champion yet: nothing to compare with")
    return Decision(ok, reasons)


def plot(task: str, y: np.ndarray, scored: list[Scored], path: Path) -> Path:
    """ROC curves (classification) or predicted-vs-actual residuals (regression) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    if task == "classification":
        from sklearn.metrics import roc_curve

        for item in scored:
            fpr, tpr, _ = roc_curve(y, item.test)
            ax.plot(fpr, tpr, label=f"{item.name} (AUC {item.metrics['roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC on the test split")
    else:
        for item in scored:
            ax.scatter(y, item.test - y, s=4, alpha=0.5, label=f"{item.name} (RMSE {item.metrics['rmse']:.2f})")
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xlabel("actual")
        ax.set_ylabel("residual")
        ax.set_title("Residuals on the test split")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def champion_splits(lake: Any, contract: Any, data: TrainingData, champion_stats: Any) -> dict[str, SplitArrays]:
    """The current validation and test rows, encoded with the champion's own feature stats.

    Same rows (the current split boundaries and labels), the champion's vocabularies and
    scaling: rebuilt from the raw tables this feature version was made from.
    """
    from core.features import assign_split, join_lookups, prepare_lookups, transform

    raw = {t: lake.read_pandas(i["uri"], i["version"]) for t, i in data.raw_tables.items()}
    joined = join_lookups(raw[contract.base_table], prepare_lookups(raw, contract), contract)
    encoded = transform(joined, contract, champion_stats)
    encoded = encoded[encoded[contract.target.name].notna()]
    current_split = assign_split(joined.loc[encoded.index, contract.time_column], data.stats)
    out = {}
    for split in ("validation", "test"):
        part = encoded[(current_split == split).to_numpy()]
        out[split] = SplitArrays(part[contract.features.categorical].to_numpy(np.int64),
                                 part[contract.features.numeric].to_numpy(np.float32),
                                 part[contract.target.name].to_numpy(np.float32))
    return out


@dataclass
class Evaluation:
    """The candidate, the baselines and the champion scored on the same test rows, and the
    gate's decision."""

    candidate: Scored
    baselines: list[Scored]
    champion: Scored | None
    decision: Decision

    @property
    def scored(self) -> list[Scored]:
        return [self.candidate, *self.baselines, *([self.champion] if self.champion else [])]


def evaluate(model: Any, data: TrainingData, linear: LinearBaseline, margin: float,
             champion: tuple[Any, Any, Any] | None, lake: Any, contract: Any) -> Evaluation:
    """Score the candidate, the baselines and the current champion (re-encoding the test rows
    with the champion's own feature statistics when they differ), then apply the gate."""
    candidate = score_model("candidate", model, data)
    baseline_scores = baselines(data, linear)
    champion_scored = None
    if champion is not None:
        version, champion_model, champion_stats = champion
        splits = None if champion_stats.fingerprint() == data.stats.fingerprint() else \
            champion_splits(lake, contract, data, champion_stats)
        champion_scored = score_model(f"champion v{version.version}", champion_model, data, splits)
    decision = gate(candidate, baseline_scores, data.task, margin, champion_scored)
    for line in decision.reasons:
        log.info("gate: %s", line)
    return Evaluation(candidate, baseline_scores, champion_scored, decision)


fit_linear_task = task(name="fit linear baseline", cache_policy=NO_CACHE)(fit_linear)
evaluate_task = task(name="evaluate", cache_policy=NO_CACHE)(evaluate)
plot_task = task(name="plot evaluation", cache_policy=NO_CACHE)(plot)
