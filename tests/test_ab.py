"""The online A/B decision: promote, keep, drop and roll back on evidence; never a faulty challenger."""

from __future__ import annotations

import numpy as np
import pytest

from core.ab import Arm, decide, decide_rollback


def arm(variant: str, version: str, n: int, skill: float, seed: int, constant: float | None = None) -> Arm:
    """Labels with a 30% positive rate; scores that separate them with ``skill`` (0: none)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(float)
    scores = 1 / (1 + np.exp(-(skill * (labels - 0.5) * 4 + rng.normal(size=n))))
    if constant is not None:
        scores = np.full(n, constant)
    return Arm(variant, version, labels, scores)


def test_a_better_challenger_is_promoted_a_worse_one_dropped_and_a_close_one_kept():
    champion = arm("champion", "1", 3000, 0.5, 1)
    better = decide("classification", champion, arm("challenger", "2", 3000, 0.9, 2), min_rows=300)
    assert better.action == "promote" and better.interval[0] > 0, better.reason
    worse = decide("classification", champion, arm("challenger", "2", 3000, 0.2, 3), min_rows=300)
    assert worse.action == "drop" and worse.interval[1] < 0, worse.reason
    same = decide("classification", champion, arm("challenger", "2", 3000, 0.5, 4), min_rows=300)
    assert same.action == "keep" and same.interval[0] < 0 < same.interval[1], same.reason
    assert "95% always-valid interval" in same.reason and same.champion.value and same.challenger.value
    assert same.test == "sequential" and same.evidence["likelihood_ratio"] < same.evidence["threshold"] == 20
    fixed = decide("classification", champion, arm("challenger", "2", 3000, 0.9, 2), min_rows=300, test="bootstrap")
    assert fixed.action == "promote" and fixed.test == "bootstrap" and "95% bootstrap interval" in fixed.reason


def test_the_always_valid_interval_and_the_evidence_agree_and_it_is_wider_than_a_fixed_one():
    """The interval excludes zero exactly when the mixture SPRT's likelihood ratio reaches
    1/alpha; it is wider than the fixed 95% interval on the same rows, and narrows as rows come."""
    from core.ab import confidence_sequence, likelihood_ratio

    for difference in np.linspace(-0.08, 0.08, 33):
        for variance in (1e-5, 1e-4, 1e-3):
            low, high = confidence_sequence(difference, variance)
            excludes_zero = low > 0 or high < 0
            assert excludes_zero == (likelihood_ratio(difference, variance) >= 20), (difference, variance)
            assert high - low > 2 * 1.96 * np.sqrt(variance)
    widths = []
    for n in (600, 2400, 9600):
        decision = decide("classification", arm("champion", "1", n, 0.5, 1), arm("challenger", "2", n, 0.5, 2),
                          min_rows=300, looks=4)
        widths.append(decision.interval[1] - decision.interval[0])
        assert decision.looks == 4 and decision.evidence["variance"] > 0
    assert widths[0] > widths[1] > widths[2]


def test_checked_after_every_batch_the_sequential_test_keeps_its_error_rate():
    """An A/A test (the same model in both arms) looked at after every 200 labelled rows: the
    sequential test almost never decides; a fixed 95% interval on the same evidence (the
    difference +- 1.96 standard errors) decides wrongly far more often. (The full simulation, 500
    repetitions against the bootstrap: benchmarks/ab_sequential.py.)"""
    wrong = {"sequential": 0, "fixed": 0}
    repetitions = 30
    for seed in range(repetitions):
        champion, challenger = arm("champion", "1", 3000, 0.5, 100 + seed), arm("challenger", "2", 3000, 0.5, 500 + seed)
        decided = {"sequential": False, "fixed": False}
        for n in range(300, 3001, 200):
            decision = decide("classification", Arm("champion", "1", champion.labels[:n], champion.scores[:n]),
                              Arm("challenger", "2", challenger.labels[:n], challenger.scores[:n]), min_rows=300)
            decided["sequential"] |= decision.action != "keep"
            decided["fixed"] |= abs(decision.difference) > 1.96 * np.sqrt(decision.evidence["variance"])
        for test, yes in decided.items():
            wrong[test] += yes
    assert wrong["sequential"] <= 0.05 * repetitions, wrong
    assert wrong["fixed"] >= 3 * max(wrong["sequential"], 1), wrong


def test_too_little_ground_truth_decides_nothing():
    for labelled in (1, 10, 120):  # one labelled row is a "constant" of no spread: not a reason to drop
        decision = decide("classification", arm("champion", "1", 3000, 0.5, 1),
                          arm("challenger", "2", labelled, 0.9, 2), min_rows=300)
        assert decision.action == "keep" and "not enough ground truth" in decision.reason, decision.reason


def test_a_faulty_challenger_is_never_promoted():
    """A constant challenger: dropped once it has min_rows labelled predictions, whatever the
    champion's skill; before that nothing is decided (one row has no spread at all)."""
    for champion_skill in (0.0, 0.5, 1.0):
        for n in (300, 3000):
            decision = decide("classification", arm("champion", "1", 3000, champion_skill, 1),
                              arm("challenger", "2", n, 0.0, 2, constant=0.3), min_rows=300)
            assert decision.action == "drop" and "constant" in decision.reason, decision.reason
    for n in (1, 10, 299):
        early = decide("classification", arm("champion", "1", 3000, 0.5, 1),
                       arm("challenger", "2", n, 0.0, 2, constant=0.3), min_rows=300)
        assert early.action == "keep" and "not enough ground truth" in early.reason, (n, early.reason)
    # Each arm needs its minimum: a constant challenger is not dropped while the champion has too
    # little ground truth to be compared with.
    thin = decide("classification", arm("champion", "1", 50, 0.5, 1), arm("challenger", "2", 3000, 0.0, 2,
                                                                           constant=0.3), min_rows=300)
    assert thin.action == "keep" and "not enough ground truth" in thin.reason, thin.reason
    # Constant over distinct inputs: the same 5 records sent again and again get one score each
    # from any model, which says nothing of the model.
    repeated = arm("challenger", "2", 3000, 0.0, 2, constant=0.3)
    repeated.inputs = np.array([f'{{"a": {i % 5}}}' for i in range(3000)])
    same_records = decide("classification", arm("champion", "1", 3000, 0.5, 1), repeated, min_rows=300)
    # (it is compared on its metric instead, and is worse)
    assert not same_records.challenger.constant and "constant" not in same_records.reason, same_records.reason
    repeated.inputs = np.array([f'{{"a": {i}}}' for i in range(3000)])
    distinct = decide("classification", arm("champion", "1", 3000, 0.5, 1), repeated, min_rows=300)
    assert distinct.action == "drop" and "on 3000 distinct inputs" in distinct.reason, distinct.reason
    # Even a champion with no skill at all is not replaced by one that ranks nothing.
    noise = decide("classification", arm("champion", "1", 3000, 0.0, 5), arm("challenger", "2", 3000, 0.0, 6),
                   min_rows=300)
    assert noise.action != "promote"


def test_a_promoted_champion_that_does_worse_than_its_predecessor_is_rolled_back():
    worse = decide_rollback("classification", arm("champion", "3", 2000, 0.2, 7), arm("champion", "2", 2000, 0.8, 8),
                            min_rows=300)
    assert worse.action == "rollback", worse.reason
    fine = decide_rollback("classification", arm("champion", "3", 2000, 0.8, 9), arm("champion", "2", 2000, 0.5, 10),
                           min_rows=300)
    assert fine.action == "drop" and "holds" in fine.reason, fine.reason  # the predecessor leaves the test


def test_the_rank_auc_is_sklearns():
    from sklearn.metrics import roc_auc_score

    from core.ab import _metric

    sample = arm("champion", "1", 2000, 0.5, 11)
    ties = np.round(sample.scores, 1)  # many ties
    for scores in (sample.scores, ties):
        assert abs(_metric("classification", sample.labels, scores) - roc_auc_score(sample.labels, scores)) < 1e-12


def test_regression_uses_rmse():
    rng = np.random.default_rng(0)
    y = rng.normal(100, 20, 1000)
    champion = Arm("champion", "1", y, y + rng.normal(0, 20, 1000))
    challenger = Arm("challenger", "2", y, y + rng.normal(0, 5, 1000))
    decision = decide("regression", champion, challenger, min_rows=300)
    assert decision.action == "promote" and decision.metric == "neg_rmse"


def _moved(alias: str, before: str | None, after: str, kind: str = "promote", at: str = "2026-01-02T00:00:00+00:00"):
    from types import SimpleNamespace

    return SimpleNamespace(alias=alias, from_version=before, to_version=after, kind=kind, at=at)


def test_what_is_under_test_comes_from_the_aliases_and_their_history():
    from core.ab import Trial, under_test

    assert under_test("m", {"champion": "1"}, []) == Trial("1", None, None)
    assert under_test("m", {"champion": "1", "challenger": "1"}, []) == Trial("1", None, None)  # the same model
    plain = under_test("m", {"champion": "1", "challenger": "2"}, [_moved("champion", None, "1")])
    assert plain == Trial("1", "2", None) and plain.arm_filter() == {"overlap_with": "2"}
    # After an A/B promotion of v2 the old champion v1 stays under test: a rollback is judged,
    # on the traffic since the promotion.
    after = under_test("m", {"champion": "2", "challenger": "1"}, [_moved("champion", None, "1"), _moved("champion", "1", "2")])
    assert after == Trial("2", "1", "1", "2026-01-02T00:00:00+00:00")
    assert after.arm_filter() == {"since": "2026-01-02T00:00:00+00:00"}
    # Once rolled back, v1 vs v2 is an ordinary test again, not another rollback.
    back = under_test("m", {"champion": "1", "challenger": "2"},
                      [_moved("champion", "1", "2"), _moved("champion", "2", "1", kind="rollback")])
    assert back.predecessor is None and back.testing == "2"
    with pytest.raises(LookupError, match="no champion"):
        under_test("m", {"challenger": "2"}, [])


def test_judge_decides_nothing_without_a_challenger_and_keeps_on_empty_arms():
    from core.ab import Trial, judge

    assert judge("classification", Trial("1", None, None), {}, 100) is None
    kept = judge("classification", Trial("1", "2", None), {}, 100)
    assert kept is not None and kept.action == "keep"  # no labelled rows yet: nothing is decided
