"""The online A/B decision: champion vs challenger on ground truth, with a confidence interval.

``decide(champion, challenger, ...)`` is a pure check that returns a decision:
- ``drop``: the challenger is faulty (its scores are constant: it does not rank anything) or
  its metric is worse than the champion's, the whole interval of the difference below zero;
- ``promote``: the challenger is better, the whole interval above ``margin``;
- ``keep``: not enough labelled rows of either variant yet, or the interval still straddles.

The interval is, by default, an always-valid 95% confidence sequence (``test="sequential"``):
the evaluate deployment looks after every batch of feedback, hourly or every minute, and a
fixed 95% interval looked at again and again excludes zero by chance far more often than 5% of
the time (``benchmarks/ab_sequential.py`` measures both). The sequence is the normal-mixture
boundary of a mixture SPRT (Robbins; Johari et al., "Always valid inference", 2017; Howard et
al., 2021) on the metric difference, whose variance comes from DeLong's structural components
(ROC AUC) or the delta method (RMSE): with the difference ``d`` and its variance ``V`` at any
look, the interval is ``d ± sqrt(V (V + τ²) / τ² · (2 log(1/α) + log((V + τ²) / V)))``, wider
than the fixed one, and valid however often it is checked. ``τ`` is the spread of differences
the test is tuned to find (2 AUC points, or 2% of the champion's RMSE). ``test="bootstrap"``
is the fixed 95% bootstrap interval of earlier releases, kept for comparison.
``decide_rollback`` does the same for a champion promoted from an earlier one, which stays
under test as the challenger after an A/B promotion: when the new champion does worse than its
predecessor on the same traffic, the decision is ``rollback``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.contract import DatasetContract
from core.lake import Lake
from core.prediction_log import labelled_predictions

Action = Literal["promote", "keep", "drop", "rollback"]
TestKind = Literal["sequential", "bootstrap"]
ALPHA = 0.05
MIXTURE_SCALE = 0.02  # τ: AUC points, or a share of the champion's RMSE


@dataclass
class Arm:
    """One model version's live rows with ground truth."""

    variant: str
    model_version: str
    labels: np.ndarray
    scores: np.ndarray
    inputs: np.ndarray | None = None  # each prediction's record as sent (None: each row its own)
    decisions: np.ndarray | None = None  # classification: the decision the service answered

    @property
    def rows(self) -> int:
        return len(self.labels)

    @property
    def distinct_inputs(self) -> int:
        return self.rows if self.inputs is None else len(np.unique(self.inputs))


@dataclass
class ArmStats:
    variant: str
    model_version: str
    rows: int
    metric: str
    value: float | None
    constant: bool


@dataclass
class Decision:
    action: Action
    reason: str
    metric: str
    champion: ArmStats
    challenger: ArmStats | None
    difference: float | None  # challenger (or new champion) minus champion (or predecessor); higher is better
    interval: tuple[float, float] | None
    test: str = "sequential"  # how the interval was made: "sequential" (always valid) or "bootstrap" (fixed)
    looks: int = 1  # how many times this pair has been judged, this one included
    evidence: dict[str, float] | None = None  # the sequential test's numbers (variance, τ, likelihood ratio)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_of(task: str) -> str:
    return "roc_auc" if task == "classification" else "neg_rmse"


def _metric(task: str, labels: np.ndarray, scores: np.ndarray) -> float:
    """Higher is better: ROC AUC, or minus the RMSE."""
    if task == "classification":
        # ROC AUC from ranks (Mann-Whitney U, ties averaged): sklearn's value, ~10x faster,
        # which the bootstrap's thousand resamples need.
        from scipy.stats import rankdata

        positive = labels == 1
        n_pos = int(positive.sum())
        n_neg = len(labels) - n_pos
        if n_pos == 0 or n_neg == 0:
            raise ValueError("ROC AUC needs both classes")
        ranks = rankdata(scores)
        return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return -float(np.sqrt(np.mean((labels - scores) ** 2)))


def _usable(task: str, arm: Arm, min_rows: int) -> bool:
    return arm.rows >= min_rows and (task != "classification" or len(np.unique(arm.labels)) == 2)


def _stats(task: str, arm: Arm, min_rows: int) -> ArmStats:
    # Constant only over at least min_rows distinct inputs: one row has no spread at all, and
    # the same record sent again gets the same score from any model.
    constant = arm.distinct_inputs >= min_rows and float(np.ptp(arm.scores)) < 1e-9
    value = _metric(task, arm.labels, arm.scores) if _usable(task, arm, min_rows) and not constant else None
    return ArmStats(arm.variant, arm.model_version, arm.rows, metric_of(task), value, constant)


def metric_variance(task: str, labels: np.ndarray, scores: np.ndarray) -> float:
    """The variance of one arm's metric estimate: DeLong's structural components for ROC AUC
    (Sun & Xu's ranks), the delta method for RMSE."""
    if task == "classification":
        from scipy.stats import rankdata

        positive = labels == 1
        m, n = int(positive.sum()), int((~positive).sum())
        if m < 2 or n < 2:
            return float("inf")
        x, z = scores[positive], scores[~positive]
        overall = rankdata(np.concatenate([x, z]))
        v10 = (overall[:m] - rankdata(x)) / n
        v01 = 1.0 - (overall[m:] - rankdata(z)) / m
        return float(v10.var(ddof=1) / m + v01.var(ddof=1) / n)
    squared = (labels - scores) ** 2
    mse = float(squared.mean())
    if len(squared) < 2 or mse <= 0:
        return float("inf") if len(squared) < 2 else 0.0
    return float(squared.var(ddof=1) / len(squared) / (4 * mse))


def confidence_sequence(difference: float, variance: float, alpha: float = ALPHA,
                        scale: float = MIXTURE_SCALE) -> tuple[float, float]:
    """The always-valid (1 - alpha) interval of a difference estimated with ``variance``: the
    normal-mixture boundary with mixture spread ``scale`` (τ). Checked at every look, it holds
    the true difference at all of them with probability 1 - alpha (asymptotically)."""
    if not np.isfinite(variance):
        return float("-inf"), float("inf")
    if variance <= 0:
        return difference, difference
    tau2 = scale * scale
    radius = np.sqrt(variance * (variance + tau2) / tau2 * (2 * np.log(1 / alpha) + np.log((variance + tau2) / variance)))
    return float(difference - radius), float(difference + radius)


def likelihood_ratio(difference: float, variance: float, scale: float = MIXTURE_SCALE, null: float = 0.0) -> float:
    """The mixture SPRT's likelihood ratio against ``difference == null``: the evidence, which
    rejects at 1/alpha (20 for 95%)."""
    if not np.isfinite(variance) or variance <= 0:
        return 1.0 if not np.isfinite(variance) else float("inf")
    tau2 = scale * scale
    exponent = (difference - null) ** 2 * tau2 / (2 * variance * (variance + tau2))
    return float(np.sqrt(variance / (variance + tau2)) * np.exp(min(exponent, 700.0)))


def sequential_difference(task: str, base: Arm, other: Arm, alpha: float = ALPHA,
                          scale: float = MIXTURE_SCALE) -> tuple[tuple[float, float], dict[str, float]]:
    """metric(other) - metric(base)'s always-valid interval and the evidence behind it. For
    RMSE the mixture spread is relative to the base arm's RMSE."""
    difference = _metric(task, other.labels, other.scores) - _metric(task, base.labels, base.scores)
    variance = metric_variance(task, base.labels, base.scores) + metric_variance(task, other.labels, other.scores)
    tau = scale if task == "classification" else scale * abs(_metric(task, base.labels, base.scores))
    tau = max(tau, 1e-12)
    low, high = confidence_sequence(difference, variance, alpha, tau)
    return (low, high), {"variance": variance, "tau": tau, "alpha": alpha,
                         "likelihood_ratio": likelihood_ratio(difference, variance, tau),
                         "threshold": 1 / alpha}


def bootstrap_difference(task: str, base: Arm, other: Arm, resamples: int, seed: int) -> tuple[float, float]:
    """95% interval of metric(other) - metric(base), resampling each arm's rows independently."""
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for i in range(resamples):
        a = rng.integers(0, base.rows, base.rows)
        b = rng.integers(0, other.rows, other.rows)
        try:
            out[i] = _metric(task, other.labels[b], other.scores[b]) - _metric(task, base.labels[a], base.scores[a])
        except ValueError:  # a resample with one class only
            out[i] = np.nan
    low, high = np.nanpercentile(out, [2.5, 97.5])
    return float(low), float(high)


def decide(task: str, champion: Arm, challenger: Arm, min_rows: int, margin: float = 0.0,
           resamples: int = 1000, seed: int = 0, test: TestKind = "sequential", alpha: float = ALPHA,
           scale: float = MIXTURE_SCALE, looks: int = 1) -> Decision:
    """The decision on the two arms' labelled rows (see the module's docstring); ``looks`` is
    how many times this pair has been judged, recorded with the decision."""
    decision = _decide(task, champion, challenger, min_rows, margin, resamples, seed, test, alpha, scale)
    decision.test, decision.looks = test, looks
    return decision


def _decide(task: str, champion: Arm, challenger: Arm, min_rows: int, margin: float, resamples: int, seed: int,
            test: TestKind, alpha: float, scale: float) -> Decision:
    metric = metric_of(task)
    champion_stats = _stats(task, champion, min_rows)
    challenger_stats = _stats(task, challenger, min_rows)
    # Nothing is decided, not even "constant", before each arm has min_rows labelled predictions.
    if not (_usable(task, champion, min_rows) and _usable(task, challenger, min_rows)):
        return Decision("keep", f"not enough ground truth yet: champion {champion.rows}, challenger "
                        f"{challenger.rows} labelled predictions, {min_rows} of each (with both classes) needed",
                        metric, champion_stats, challenger_stats, None, None)
    if challenger_stats.constant:
        return Decision("drop", f"challenger v{challenger.model_version} predicts a constant "
                        f"({challenger.scores[0]:.4g}) on {challenger.distinct_inputs} distinct inputs: it ranks "
                        "nothing", metric, champion_stats, challenger_stats, None, None)
    if champion_stats.value is None or challenger_stats.value is None:
        return Decision("keep", f"no decision: the champion v{champion.model_version} predicts a constant on "
                        f"{champion.distinct_inputs} distinct inputs, and the challenger is compared with nothing",
                        metric, champion_stats, challenger_stats, None, None)
    difference = challenger_stats.value - champion_stats.value
    evidence: dict[str, float] | None = None
    if test == "sequential":
        (low, high), evidence = sequential_difference(task, champion, challenger, alpha, scale)
        kind = f"{1 - alpha:.0%} always-valid interval"
    else:
        low, high = bootstrap_difference(task, champion, challenger, resamples, seed)
        kind = "95% bootstrap interval"
    numbers = (f"{metric} challenger v{challenger.model_version} {challenger_stats.value:.4f} vs champion "
               f"v{champion.model_version} {champion_stats.value:.4f}: difference {difference:+.4f}, "
               f"{kind} [{low:+.4f}, {high:+.4f}] on {challenger.rows} and {champion.rows} rows")
    action: Action = "drop" if high < 0 else "promote" if low > margin else "keep"
    reason = {"drop": f"the challenger is worse: {numbers}",
              "promote": f"the challenger is better by more than {margin}: {numbers}",
              "keep": f"no decision yet: {numbers}"}[action]
    return Decision(action, reason, metric, champion_stats, challenger_stats, difference, (low, high),
                    evidence=evidence)


def decide_rollback(task: str, champion: Arm, predecessor: Arm, min_rows: int, resamples: int = 1000,
                    seed: int = 0, test: TestKind = "sequential", alpha: float = ALPHA,
                    scale: float = MIXTURE_SCALE, looks: int = 1) -> Decision:
    """A promoted champion against the champion it replaced, on the same traffic: after an A/B
    promotion the predecessor stays under test as the challenger. If the predecessor does
    better, ``rollback``; if it does worse, ``drop`` it (the promotion stands); else ``keep``."""
    decision = decide(task, champion, predecessor, min_rows, 0.0, resamples, seed, test, alpha, scale, looks)
    numbers = decision.reason.partition(": ")[2] or decision.reason
    if decision.action == "promote":
        return replace(decision, action="rollback", reason=f"the promoted champion v{champion.model_version} does "
                       f"worse than v{predecessor.model_version} before it, on the same traffic: {numbers}")
    if decision.action == "drop":
        return replace(decision, reason=f"the promotion of v{champion.model_version} holds: "
                       f"v{predecessor.model_version} before it does worse on the same traffic and leaves the "
                       f"test: {numbers}")
    return replace(decision, reason=f"the promoted champion v{champion.model_version} against "
                   f"v{predecessor.model_version} before it: {decision.reason}")


def labelled_arms(lake: Lake, contract: DatasetContract, overlap_with: str | None = None,
                  since: Any = None) -> dict[str, Arm]:
    """Per model version: its served predictions that have feedback. With ``overlap_with`` (the
    challenger under test), only predictions served since that version served its first; with
    ``since`` (a timestamp), only those served since then. The arms are compared on the same
    days' traffic, not the champion's whole history against the challenger's last few days
    (the season moves the metric of both)."""
    labelled = labelled_predictions(lake, contract, with_inputs=True)
    if since is not None:
        labelled = labelled[labelled["ts"] >= pd.Timestamp(since)]
    if overlap_with is not None:
        mine = labelled.loc[labelled["model_version"].astype(str) == str(overlap_with), "ts"]
        if len(mine):
            labelled = labelled[labelled["ts"] >= mine.min()]
    arms = {}
    for version, part in labelled.groupby("model_version"):
        variant = str(pd.Series(part["variant"]).mode().iloc[0])
        decisions = part["decision"] if "decision" in part else None
        arms[str(version)] = Arm(variant, str(version), part["label"].to_numpy(float), part["score"].to_numpy(float),
                                 part["inputs"].to_numpy(str) if "inputs" in part else None,
                                 decisions.fillna(False).to_numpy(bool)
                                 if decisions is not None and decisions.notna().any() else None)
    return arms


DECISION_TAG = "flywheel.ab_decision"


def looks_so_far(registry: Any, name: str, trial: Trial) -> int:
    """How many decisions were recorded for this trial's pair before (the tag on the version
    under test names both versions): the next decision is look number this + 1."""
    other = trial.predecessor or trial.testing
    if other is None:
        return 0
    try:
        text = registry.client.get_model_version(name, other).tags.get(DECISION_TAG)
        earlier = json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - a missing or unreadable tag counts as no look
        return 0
    if not isinstance(earlier, dict):
        return 0
    versions = {str((earlier.get(arm) or {}).get("model_version")) for arm in ("champion", "challenger")}
    return int(earlier.get("looks", 1)) if versions == {trial.champion, other} else 0


def record_decision(registry: Any, name: str, decision: Decision) -> None:
    """The decision on both model versions, as the tag ``flywheel.ab_decision``."""
    text = json.dumps(decision.as_dict(), default=str, sort_keys=True)
    for arm in (decision.champion, decision.challenger):
        if arm is not None:
            registry.client.set_model_version_tag(name, arm.model_version, DECISION_TAG, text)


@dataclass(frozen=True)
class Trial:
    """What an A/B evaluation judges, from the registry's aliases and their history."""

    champion: str
    testing: str | None  # the challenger under test (None: nothing to judge)
    predecessor: str | None  # an A/B-promoted champion's predecessor, still under test: rollback is judged
    since: Any = None  # a rollback is judged on the traffic since the promotion

    def arm_filter(self) -> dict[str, Any]:
        """``labelled_arms``' window: since the promotion, or since the challenger first served."""
        return {"since": self.since} if self.predecessor else {"overlap_with": self.testing}


def under_test(model_name: str, aliases: dict[str, str], history: list[Any]) -> Trial:
    """The trial the aliases describe. After an A/B promotion the old champion stays under test
    as the challenger: the promoted one is judged against it on the same traffic since the
    promotion (rolled back if worse); any other challenger is judged for promotion or drop."""
    from core.registry import CHALLENGER, CHAMPION

    champion, challenger = aliases.get(CHAMPION), aliases.get(CHALLENGER)
    if champion is None:
        raise LookupError(f"{model_name} has no champion")
    testing = challenger if challenger and challenger != champion else None
    promotion = next((e for e in reversed(history) if e.alias == CHAMPION), None)
    if (testing and promotion is not None and promotion.to_version == champion and promotion.from_version == testing
            and promotion.kind != "rollback"):
        return Trial(champion, testing, testing, promotion.at)
    return Trial(champion, testing, None)


def arm_of(arms: dict[str, Arm], version: str, variant: str) -> Arm:
    """``version``'s labelled arm, or an empty one when it has no labelled rows yet."""
    return arms.get(version) or Arm(variant, version, np.empty(0), np.empty(0))


def judge(task: str, trial: Trial, arms: dict[str, Arm], min_rows: int, margin: float = 0.0,
          test: TestKind = "sequential", alpha: float = ALPHA, scale: float = MIXTURE_SCALE,
          looks: int = 1) -> Decision | None:
    """The decision for ``trial`` on its labelled arms (``decide_rollback`` or ``decide``);
    None when nothing is under test. ``looks``: this look's number for the pair."""
    def arm(version: str, variant: str) -> Arm:
        return arm_of(arms, version, variant)

    if trial.predecessor:
        return decide_rollback(task, arm(trial.champion, "champion"), arm(trial.predecessor, "challenger"), min_rows,
                               test=test, alpha=alpha, scale=scale, looks=looks)
    if trial.testing:
        return decide(task, arm(trial.champion, "champion"), arm(trial.testing, "challenger"), min_rows, margin,
                      test=test, alpha=alpha, scale=scale, looks=looks)
    return None


def summary(model_name: str, decision: Decision) -> str:
    """The decision as Markdown (a Prefect artifact)."""
    lines = [f"# {model_name}: **{decision.action}**", "", decision.reason, "",
             f"| variant | version | labelled rows | {decision.metric} | constant |", "|---|---|---|---|---|"]
    for arm in (decision.champion, decision.challenger):
        if arm is not None:
            value = "n/a" if arm.value is None else f"{arm.value:.4f}"
            lines.append(f"| {arm.variant} | {arm.model_version} | {arm.rows} | {value} | {arm.constant} |")
    if decision.interval:
        kind = "always-valid (sequential) interval" if decision.test == "sequential" else "95% bootstrap interval"
        lines += ["", f"Difference {decision.difference:+.4f}, {kind} "
                      f"[{decision.interval[0]:+.4f}, {decision.interval[1]:+.4f}], look {decision.looks}"]
    if decision.evidence:
        lines += ["", "| evidence | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4g} |" for key, value in sorted(decision.evidence.items())]
    return "\n".join(lines)
