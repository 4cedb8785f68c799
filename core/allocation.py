"""The challenger's share of the traffic: fixed, a rollout step, or Thompson sampling.

The share a service routes by lives on the registered model, as the tag ``flywheel.allocation``
(JSON), beside the aliases it belongs with. Every service worker reads it when it follows the
aliases, so a change made by the evaluate flow, a rollout or a person reaches every worker
within ``serving.alias_poll_s``. It names the challenger version it was made for: a share set
for another challenger is ignored, and the service falls back to ``serving.challenger_share``.
Routing stays sticky (``serving.router``): a routing key keeps its variant while the share
stands, and only the keys between the old and the new share move when it changes.

Thompson sampling (``serving.allocation: thompson``; anchor: Seldon's multi-armed bandit
routers): each arm's reward on ground truth is a Beta-Bernoulli posterior (a binary target's
reward is a correct decision; a regression's, an absolute error below the champion's median
one on the same window). The challenger's share is the posterior probability that it is the
better arm (probability matching), held within ``[floor, ceiling]`` so neither arm starves.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np

ALLOCATION_TAG = "flywheel.allocation"
Source = Literal["rollout", "thompson", "manual"]


@dataclass(frozen=True)
class Allocation:
    """The challenger's share of routing keys, for one challenger version."""

    share: float
    challenger_version: str
    source: Source
    reason: str
    at: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"a challenger share is between 0 and 1, not {self.share}")

    def to_tag(self) -> str:
        fields = asdict(self)
        fields["at"] = self.at or datetime.now(UTC).isoformat(timespec="seconds")
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_tag(cls, text: str | None) -> Allocation | None:
        """The tag's allocation; None when there is none or it cannot be read (a person may
        have edited it in the MLflow UI: the service then routes by its configured share)."""
        if not text:
            return None
        try:
            return cls(**json.loads(text))
        except (TypeError, ValueError):
            return None


def effective_share(tags: dict[str, str], challenger_version: str | None, default: float) -> tuple[float, str]:
    """(share, where it came from) for the challenger being served: the registered model's
    allocation when it was made for this challenger, else the configured default."""
    if challenger_version is None:
        return 0.0, "no challenger"
    allocation = Allocation.from_tag(tags.get(ALLOCATION_TAG))
    if allocation is not None and allocation.challenger_version == str(challenger_version):
        return allocation.share, allocation.source
    return default, "configured"


@dataclass(frozen=True)
class Reward:
    """One arm's ground-truth reward: successes out of labelled rows."""

    successes: int
    trials: int

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else float("nan")


def rewards(task: str, champion: Any, challenger: Any) -> tuple[Reward, Reward]:
    """Each arm's reward (``core.ab.Arm``s): a correct decision (binary target, the decision the
    service returned), or an absolute error below the champion's median one (regression)."""
    if task == "classification":
        def correct(arm: Any) -> Reward:
            decisions = arm.decisions if arm.decisions is not None else arm.scores >= 0.5
            return Reward(int((decisions.astype(bool) == arm.labels.astype(bool)).sum()), arm.rows)
        return correct(champion), correct(challenger)
    if champion.rows == 0:
        return Reward(0, 0), Reward(0, challenger.rows)
    bar = float(np.median(np.abs(champion.labels - champion.scores)))
    below = [Reward(int((np.abs(a.labels - a.scores) < bar).sum()), a.rows) for a in (champion, challenger)]
    return below[0], below[1]


def thompson_share(champion: Reward, challenger: Reward, floor: float = 0.05, ceiling: float = 0.95,
                   draws: int = 20_000, seed: int = 0) -> float:
    """The posterior probability that the challenger's reward rate is the higher (Beta(1 + s,
    1 + f) each), within ``[floor, ceiling]``. The draws use a fixed seed: the same counts give
    the same share in every worker and run."""
    if not 0.0 <= floor <= ceiling <= 1.0:
        raise ValueError(f"need 0 <= floor <= ceiling <= 1, not floor {floor}, ceiling {ceiling}")
    rng = np.random.default_rng(seed)
    a = rng.beta(1 + champion.successes, 1 + champion.trials - champion.successes, draws)
    b = rng.beta(1 + challenger.successes, 1 + challenger.trials - challenger.successes, draws)
    return float(min(max(float((b > a).mean()), floor), ceiling))


def thompson_allocation(task: str, champion: Any, challenger: Any, floor: float, ceiling: float) -> Allocation:
    """The new allocation for ``challenger`` (a ``core.ab.Arm``) from both arms' rewards."""
    mine, theirs = rewards(task, champion, challenger)
    share = thompson_share(mine, theirs, floor, ceiling)
    reason = (f"Thompson sampling: challenger v{challenger.model_version} reward {theirs.successes}/{theirs.trials}, "
              f"champion v{champion.model_version} {mine.successes}/{mine.trials}: P(challenger better) within "
              f"[{floor}, {ceiling}] = {share:.3f}")
    return Allocation(share, str(challenger.model_version), "thompson", reason)


def bandit_step(mode: str, task: str, trial: Any, arms: dict[str, Any], floor: float) -> Allocation | None:
    """The evaluate flow's allocation update: with ``serving.allocation: thompson`` and a
    challenger under test (``core.ab.Trial``; not a promoted champion's rollback check), the
    challenger's new share from both arms' labelled rows; else None (the share stays)."""
    if mode != "thompson" or not trial.testing or trial.predecessor:
        return None
    from core.ab import arm_of

    champion, challenger = arm_of(arms, trial.champion, "champion"), arm_of(arms, trial.testing, "challenger")
    return thompson_allocation(task, champion, challenger, floor, 1 - floor)
