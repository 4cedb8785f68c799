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
