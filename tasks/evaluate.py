"""Evaluation on the time-based test split: the candidate, two baselines, the champion."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.families import Fitted
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


@dataclass
class LinearBaseline:
    """The linear model fitted on the training split, as the weights that start the network's
    wide part (``tabular_net`` learns a residual over it)."""

    name: str
    wide_init: dict[str, Any]


def fit_linear(data: TrainingData) -> LinearBaseline:
    """Fit the logistic (classification) or ridge (regression) model on the training split
    (deterministic: lbfgs / closed form)."""
    from core.families.linear import fit_weights

    train = data.splits["train"]
    weights = fit_weights(data.task, train.categorical, train.numeric, train.target,
                          data.spec_base()["cardinalities"])
    return LinearBaseline("logistic" if data.task == "classification" else "linear", weights)


def baselines(data: TrainingData) -> list[Scored]:
    """The prior predictor: the training split's positive rate (classification) or mean."""
    train, val, test = (data.splits[s] for s in ("train", "validation", "test"))
    prior = float(train.target.mean())
    return [score("prior", data.task, np.full(len(val), prior), np.full(len(test), prior), data)]


def score_model(name: str, model: Fitted, data: TrainingData, splits: dict[str, SplitArrays] | None = None) -> Scored:
    splits = splits or data.splits
    return score(name, data.task, model.predict(splits["validation"].categorical, splits["validation"].numeric),
                 model.predict(splits["test"].categorical, splits["test"].numeric), data)


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


def paired_difference(task: str, labels: np.ndarray, candidate: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """The candidate's primary metric minus the other model's, on the same rows, and the
    standard error of that difference: DeLong's variance for two correlated ROC AUCs
    (classification; Sun & Xu's fast form), the paired squared errors' for MSE (regression)."""
    y = np.asarray(labels, dtype=np.float64)
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if task != "classification":
        d = (a - y) ** 2 - (b - y) ** 2
        return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    from scipy.stats import rankdata

    positive = y == 1
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        return float("nan"), float("inf")
    aucs, v10, v01 = [], [], []
    for scores in (a, b):
        x, z = scores[positive], scores[~positive]
        tx, tz, tall = rankdata(x), rankdata(z), rankdata(np.concatenate([x, z]))
        aucs.append((tall[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tall[:m] - tx) / n)
        v01.append(1.0 - (tall[m:] - tz) / m)
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return float(aucs[0] - aucs[1]), float(np.sqrt(max(variance, 0.0)))


def clearly_worse(task: str, labels: np.ndarray, candidate: Scored, champion: Scored,
                  margin: float) -> tuple[bool, str]:
    """Whether the candidate is worse than the champion by more than the margin with 95%
    confidence on the same test rows (the whole interval of the paired difference beyond the
    margin), and the numbers in words. A difference within the noise of the test rows is for
    the online A/B to settle, on live traffic."""
    metric, _ = PRIMARY[task]
    difference, se = paired_difference(task, labels, candidate.test, champion.test)
    rows = f"{len(labels):,} test rows"
    if task == "classification":
        low, high = difference - 1.96 * se, difference + 1.96 * se
        worse = high < -margin
        numbers = (f"difference {difference:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}] on the same {rows} "
                   "(DeLong)")
    else:
        # MSE difference; the margin is relative RMSE: worse than (1 + margin) x the champion's RMSE.
        allowed = ((1 + margin) ** 2 - 1) * champion.metrics["rmse"] ** 2
        low = difference - 1.96 * se
        worse = low > allowed
        numbers = (f"MSE difference {difference:+.4g}, 95% interval [{low:+.4g}, {difference + 1.96 * se:+.4g}] "
                   f"on the same {rows}")
    return worse, numbers


def gate(candidate: Scored, baselines: list[Scored], task: str, margin: float,
         champion: Scored | None = None, labels: np.ndarray | None = None) -> Decision:
    """Register (as challenger) only if the candidate beats every baseline by the margin and is
    not worse than the current champion, scored on the same test rows, by more than the margin.
    With the test ``labels``, "worse by more than the margin" must hold with 95% confidence on
    those rows (a paired interval, ``clearly_worse``): a difference inside the noise of the test
    rows is left to the online A/B, which decides on live ground truth. The reasons list every
    comparison, passed or not, with its numbers."""
    metric, _ = PRIMARY[task]
    reasons = []
    ok = True
    for other in baselines:
        won = beats(candidate.metrics, other.metrics, task, margin)
        ok &= won
        reasons.append(f"{metric} {candidate.metrics[metric]:.4f} vs {other.name} {other.metrics[metric]:.4f}: "
                       f"{'beats' if won else 'does not beat'} it by the margin {margin}")
    if champion is not None:
        text = f"{metric} {candidate.metrics[metric]:.4f} vs {champion.name} {champion.metrics[metric]:.4f}"
        if labels is not None and len(labels) == len(candidate.test) == len(champion.test):
            worse, numbers = clearly_worse(task, labels, candidate, champion, margin)
            held = not worse
            verdict = ("not clearly worse than the champion by more than the margin" if held
                       else "worse than the champion by more than the margin")
            reasons.append(f"{text}: {verdict} {margin} ({numbers})")
        else:
            held = not_worse(candidate.metrics, champion.metrics, task, margin)
            verdict = "not worse than" if held else "worse than"
            reasons.append(f"{text}: {verdict} the champion by more than the margin {margin}")
        ok &= held
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
class Standing:
    """One family's best trial in the competition: its validation loss (what chose the winner)
    and its test metrics."""

    family: str
    val_loss: float
    scored: Scored


def competition_reason(standings: list[Standing]) -> str:
    """The competition in one line: the winner and by how much it led each other family on
    validation loss."""
    winner, rest = standings[0], standings[1:]
    text = f"winner {winner.family} (validation loss {winner.val_loss:.4f})"
    if not rest:
        return text + ", the only family that finished"

    def versus(other: Standing) -> str:
        lead = other.val_loss - winner.val_loss
        if lead >= 0:
            return f"{other.family} ({other.val_loss:.4f}, by {lead:.4f})"
        return (f"{other.family} ({other.val_loss:.4f}, lower by {-lead:.4f}: a near tie, which goes to the "
                "family listed first)")

    return text + ", ahead of " + ", ".join(versus(s) for s in rest)


@dataclass
class Evaluation:
    """The winner, every family's best, the prior baseline and the champion scored on the same
    test rows, and the gate's decision."""

    candidate: Scored
    baselines: list[Scored]
    champion: Scored | None
    decision: Decision
    families: list[Standing] = field(default_factory=list)

    @property
    def family(self) -> str:
        return self.families[0].family if self.families else "tabular_net"

    @property
    def scored(self) -> list[Scored]:
        others = [s.scored for s in self.families[1:]]
        return [self.candidate, *others, *self.baselines, *([self.champion] if self.champion else [])]


def evaluate(models: dict[str, Fitted], val_losses: dict[str, float], data: TrainingData, margin: float,
             champion: tuple[Any, Any, Any] | None, lake: Any, contract: Any) -> Evaluation:
    """Score each family's best (``models``, the winner first) and the prior on the test split,
    and the current champion on the same rows (re-encoded with the champion's own feature
    statistics when they differ); then apply the gate to the winner."""
    standings = [Standing(family, val_losses[family], score_model(family, model, data))
                 for family, model in models.items()]
    candidate = standings[0].scored
    baseline_scores = baselines(data)
    champion_scored = None
    if champion is not None:
        version, champion_model, champion_stats = champion
        splits = None if champion_stats.fingerprint() == data.stats.fingerprint() else \
            champion_splits(lake, contract, data, champion_stats)
        champion_scored = score_model(f"champion v{version.version}", champion_model, data, splits)
    decision = gate(candidate, baseline_scores, data.task, margin, champion_scored, data.splits["test"].target)
    decision.reasons.insert(0, competition_reason(standings))
    for line in decision.reasons:
        log.info("gate: %s", line)
    return Evaluation(candidate, baseline_scores, champion_scored, decision, standings)


fit_linear_task = task(name="fit linear start", cache_policy=NO_CACHE)(fit_linear)
evaluate_task = task(name="evaluate", cache_policy=NO_CACHE)(evaluate)
plot_task = task(name="plot evaluation", cache_policy=NO_CACHE)(plot)
