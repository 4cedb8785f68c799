"""The online A/B decision: champion vs challenger on ground truth, with a confidence interval.

``decide(champion, challenger, ...)`` is a pure check that returns a decision:
- ``drop``: the challenger is faulty (its scores are constant: it does not rank anything) or
  its metric is worse than the champion's, the whole 95% bootstrap interval of the difference
  below zero;
- ``promote``: the challenger is better, the whole interval above ``margin``;
- ``keep``: not enough labelled rows of either variant yet, or the interval still straddles.
``decide_rollback`` does the same for a champion promoted from an earlier one, which stays
under test as the challenger after an A/B promotion: when the new champion does worse than its
predecessor on the same traffic, the decision is ``rollback``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from core.contract import DatasetContract
from core.lake import Lake
from core.prediction_log import labelled_predictions

Action = Literal["promote", "keep", "drop", "rollback"]


@dataclass
class Arm:
    """One model version's live rows with ground truth."""

    variant: str
    model_version: str
    labels: np.ndarray
    scores: np.ndarray
    inputs: np.ndarray | None = None  # each prediction's record as sent (None: each row its own)

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
           resamples: int = 1000, seed: int = 0) -> Decision:
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
    low, high = bootstrap_difference(task, champion, challenger, resamples, seed)
    numbers = (f"{metric} challenger v{challenger.model_version} {challenger_stats.value:.4f} vs champion "
               f"v{champion.model_version} {champion_stats.value:.4f}: difference {difference:+.4f}, "
               f"95% interval [{low:+.4f}, {high:+.4f}] on {challenger.rows} and {champion.rows} rows")
    if high < 0:
        return Decision("drop", f"the challenger is worse: {numbers}", metric, champion_stats, challenger_stats,
                        difference, (low, high))
    if low > margin:
        return Decision("promote", f"the challenger is better by more than {margin}: {numbers}", metric,
                        champion_stats, challenger_stats, difference, (low, high))
    return Decision("keep", f"no decision yet: {numbers}", metric, champion_stats, challenger_stats, difference,
                    (low, high))


def decide_rollback(task: str, champion: Arm, predecessor: Arm, min_rows: int, resamples: int = 1000,
                    seed: int = 0) -> Decision:
    """A promoted champion against the champion it replaced, on the same traffic: after an A/B
    promotion the predecessor stays under test as the challenger. If the predecessor does
    better, ``rollback``; if it does worse, ``drop`` it (the promotion stands); else ``keep``."""
    decision = decide(task, champion, predecessor, min_rows, 0.0, resamples, seed)
    numbers = decision.reason.partition(": ")[2] or decision.reason
    if decision.action == "promote":
        return Decision("rollback", f"the promoted champion v{champion.model_version} does worse than v"
                        f"{predecessor.model_version} before it, on the same traffic: {numbers}", decision.metric,
                        decision.champion, decision.challenger, decision.difference, decision.interval)
    if decision.action == "drop":
        return Decision("drop", f"the promotion of v{champion.model_version} holds: v{predecessor.model_version} "
                        f"before it does worse on the same traffic and leaves the test: {numbers}",
                        decision.metric, decision.champion, decision.challenger, decision.difference,
                        decision.interval)
    return Decision("keep", f"the promoted champion v{champion.model_version} against v{predecessor.model_version} "
                    f"before it: {decision.reason}", decision.metric, decision.champion, decision.challenger,
                    decision.difference, decision.interval)


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
        arms[str(version)] = Arm(variant, str(version), part["label"].to_numpy(float), part["score"].to_numpy(float),
                                 part["inputs"].to_numpy(str) if "inputs" in part else None)
    return arms


def record_decision(registry: Any, name: str, decision: Decision) -> None:
    """The decision on both model versions, as the tag ``flywheel.ab_decision``."""
    text = json.dumps(decision.as_dict(), default=str, sort_keys=True)
    for arm in (decision.champion, decision.challenger):
        if arm is not None:
            registry.client.set_model_version_tag(name, arm.model_version, "flywheel.ab_decision", text)


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


def judge(task: str, trial: Trial, arms: dict[str, Arm], min_rows: int, margin: float = 0.0) -> Decision | None:
    """The decision for ``trial`` on its labelled arms (``decide_rollback`` or ``decide``);
    None when nothing is under test."""
    def arm(version: str, variant: str) -> Arm:
        return arms.get(version) or Arm(variant, version, np.empty(0), np.empty(0))

    if trial.predecessor:
        return decide_rollback(task, arm(trial.champion, "champion"), arm(trial.predecessor, "challenger"), min_rows)
    if trial.testing:
        return decide(task, arm(trial.champion, "champion"), arm(trial.testing, "challenger"), min_rows, margin)
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
        lines += ["", f"Difference {decision.difference:+.4f}, 95% bootstrap interval "
                      f"[{decision.interval[0]:+.4f}, {decision.interval[1]:+.4f}]"]
    return "\n".join(lines)
