"""Thompson-sampling allocation: the better arm gets the traffic, neither starves, the same
counts give the same share everywhere; rewards are correct decisions or errors below the
champion's."""

from __future__ import annotations

import numpy as np
import pytest

from core.ab import Arm
from core.allocation import Allocation, Reward, rewards, thompson_allocation, thompson_share


def test_the_share_follows_the_evidence_within_the_floor_and_ceiling():
    assert thompson_share(Reward(0, 0), Reward(0, 0)) == pytest.approx(0.5, abs=0.02)
    clear = thompson_share(Reward(600, 1000), Reward(700, 1000), floor=0.05, ceiling=0.95)
    assert clear == 0.95
    assert thompson_share(Reward(700, 1000), Reward(600, 1000), floor=0.05, ceiling=0.95) == 0.05
    unsure = thompson_share(Reward(30, 50), Reward(33, 50))
    assert 0.5 < unsure < 0.9
    assert thompson_share(Reward(30, 50), Reward(33, 50)) == unsure  # fixed draws: every worker agrees
    with pytest.raises(ValueError, match="floor"):
        thompson_share(Reward(1, 2), Reward(1, 2), floor=0.6, ceiling=0.4)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Allocation(1.5, "2", "manual", "typo")


def test_rewards_are_correct_decisions_or_errors_below_the_champions():
    labels = np.array([1, 0, 1, 0], dtype=float)
    champion = Arm("champion", "1", labels, np.array([0.9, 0.1, 0.2, 0.3]), decisions=np.array([1, 0, 0, 0], bool))
    challenger = Arm("challenger", "2", labels, np.array([0.9, 0.8, 0.7, 0.1]), decisions=np.array([1, 1, 1, 0], bool))
    mine, theirs = rewards("classification", champion, challenger)
    assert (mine.successes, mine.trials, theirs.successes, theirs.trials) == (3, 4, 3, 4)
    y = np.array([10.0, 20.0, 30.0, 40.0])
    champion = Arm("champion", "1", y, y + np.array([1.0, 2.0, 3.0, 4.0]))  # median |error| 2.5
    challenger = Arm("challenger", "2", y, y + np.array([0.5, -1.0, 9.0, 2.0]))
    mine, theirs = rewards("regression", champion, challenger)
    assert (mine.successes, theirs.successes) == (2, 3)
    allocation = thompson_allocation("regression", champion, challenger, 0.1, 0.9)
    assert allocation.challenger_version == "2" and allocation.source == "thompson" and "3/4" in allocation.reason


@pytest.mark.parametrize("champion_rate,challenger_rate", [(0.60, 0.70), (0.70, 0.60)])
def test_the_better_arm_gets_most_traffic_within_2000_labelled_rows(champion_rate, challenger_rate):
    """The bandit simulation (benchmarks/bandit.py) with a fixed seed: the better arm, as
    challenger or as champion, is routed >= 80% of the keys after 2,000 labelled rows, and loses
    less reward than a fixed 50/50 split."""
    from benchmarks.bandit import simulate

    run = simulate(champion_rate, challenger_rate, rows=2000, update_every=100, floor=0.05, seed=0)
    better = run["shares"][-1] if challenger_rate > champion_rate else 1 - run["shares"][-1]
    assert better >= 0.8, run["shares"]
    fixed = simulate(champion_rate, challenger_rate, rows=2000, update_every=100, floor=0.05, seed=0, thompson=False)
    assert run["regret"] < fixed["regret"] / 2, (run["regret"], fixed["regret"])


def test_with_equal_rewards_neither_arm_falls_below_the_floor():
    from benchmarks.bandit import simulate

    for seed in range(3):
        run = simulate(0.65, 0.65, rows=3000, update_every=100, floor=0.05, seed=seed)
        assert min(run["shares"]) >= 0.05 and max(run["shares"]) <= 0.95
        assert 0.05 <= run["to_challenger"].mean() <= 0.95
