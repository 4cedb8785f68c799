"""The registration gate: baselines must be beaten by the margin, the champion must not be
beaten by more than the margin, and every comparison is in the decision."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluate import Scored, gate


def scored(name: str, **metrics: float) -> Scored:
    return Scored(name, np.zeros(1), np.zeros(1), dict(metrics))


PRIOR = scored("prior", roc_auc=0.5)


@pytest.mark.parametrize("logistic, registers", [(0.7005, True), (0.7015, False)])
def test_a_baseline_must_be_beaten_by_the_margin(logistic, registers):
    decision = gate(scored("candidate", roc_auc=0.7030), [PRIOR, scored("logistic", roc_auc=logistic)],
                    "classification", 0.002)
    assert decision.register is registers
    assert decision.reasons[1].startswith(f"roc_auc 0.7030 vs logistic {logistic:.4f}: "
                                          f"{'beats' if registers else 'does not beat'} it by the margin 0.002")
    assert decision.reasons[2] == "no champion yet: nothing to compare with"


@pytest.mark.parametrize("champion_auc, registers", [(0.7040, True), (0.7060, False), (0.6900, True)])
def test_the_champion_must_not_be_worse_by_more_than_the_margin(champion_auc, registers):
    decision = gate(scored("candidate", roc_auc=0.7030), [PRIOR, scored("logistic", roc_auc=0.6900)],
                    "classification", 0.002, scored("champion v1", roc_auc=champion_auc))
    assert decision.register is registers
    assert len(decision.reasons) == 3  # prior, logistic and the champion, all listed
    verdict = "not worse than" if registers else "worse than"
    assert decision.reasons[2] == (f"roc_auc 0.7030 vs champion v1 {champion_auc:.4f}: {verdict} the champion "
                                   "by more than the margin 0.002")


def test_regression_margins_are_relative_rmse():
    linear = scored("linear", rmse=50.0)
    assert gate(scored("candidate", rmse=48.0), [linear], "regression", 0.02).register  # 4% better
    assert not gate(scored("candidate", rmse=49.5), [linear], "regression", 0.02).register  # 1% better
    champion = scored("champion v2", rmse=47.0)
    assert gate(scored("candidate", rmse=47.9), [linear], "regression", 0.02, champion).register  # 1.9% worse
    assert not gate(scored("candidate", rmse=48.4), [linear], "regression", 0.02, champion).register  # 3% worse


def _two_models(n: int, edge: float, seed: int = 0):
    """Labels and two models' scores on the same rows: the second has ``edge`` more signal."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.25).astype(float)
    shared = rng.normal(size=n)
    first = labels * 1.0 + shared + rng.normal(0, 0.5, n)
    second = labels * (1.0 + edge) + shared + rng.normal(0, 0.5, n)
    return labels, first, second


def test_delongs_paired_difference_agrees_with_a_paired_bootstrap():
    from sklearn.metrics import roc_auc_score

    from tasks.evaluate import paired_difference

    labels, first, second = _two_models(4000, 0.1)
    difference, se = paired_difference("classification", labels, second, first)
    assert difference == pytest.approx(roc_auc_score(labels, second) - roc_auc_score(labels, first), abs=1e-9)
    rng = np.random.default_rng(1)
    draws = []
    for _ in range(300):
        rows = rng.integers(0, len(labels), len(labels))
        draws.append(roc_auc_score(labels[rows], second[rows]) - roc_auc_score(labels[rows], first[rows]))
    assert se == pytest.approx(np.std(draws), rel=0.2)


def test_the_champion_blocks_only_a_winner_that_is_clearly_worse_on_the_same_rows():
    """The same rows: a winner behind the champion by more than the margin but within the
    noise of the test rows registers (the online A/B decides); one clearly behind does not."""
    from sklearn.metrics import roc_auc_score

    labels, weak, strong = _two_models(3000, 0.8)
    prior = scored("prior", roc_auc=0.5)

    def model(name, scores):
        return Scored(name, np.zeros(1), scores, {"roc_auc": float(roc_auc_score(labels, scores))})

    clearly = gate(model("winner", weak), [prior], "classification", 0.002, model("champion v1", strong), labels)
    assert not clearly.register and "worse than the champion by more than the margin" in clearly.reasons[1]
    assert "(DeLong)" in clearly.reasons[1] and "3,000 test rows" in clearly.reasons[1]
    rng = np.random.default_rng(5)
    close = strong + rng.normal(0, 0.27, len(strong))  # a little behind, inside the noise
    champion, winner = model("champion v1", strong), model("winner", close)
    assert champion.metrics["roc_auc"] - winner.metrics["roc_auc"] > 0.002
    decision = gate(winner, [prior], "classification", 0.002, champion, labels)
    assert decision.register and "not clearly worse than the champion" in decision.reasons[1], decision.reasons


def test_the_competition_in_words_names_the_lead_and_a_near_tie():
    from tasks.evaluate import Standing, competition_reason

    def standing(family, loss):
        return Standing(family, loss, scored(family, roc_auc=0.7))

    assert competition_reason([standing("gbdt", 0.43), standing("tabular_net", 0.4337)]) == (
        "winner gbdt (validation loss 0.4300), ahead of tabular_net (0.4337, by 0.0037)")
    tie = competition_reason([standing("tabular_net", 0.4750), standing("gbdt", 0.4745)])
    assert "gbdt (0.4745, lower by 0.0005: a near tie, which goes to the family listed first)" in tie
