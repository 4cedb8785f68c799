"""Progressive rollout: the analysis per step, and whole rollouts on simulated traffic: a better
challenger reaches 100% and is promoted; one that errors on 5% of its requests or answers 50 ms
slower is rolled back at the first step. (The same on a real service: tests/test_serving.py.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from core.ab import Arm, decide
from core.rollout import (
    RolloutError,
    RolloutPlan,
    StepAnalysis,
    VariantWindow,
    analyse,
    histogram_quantile,
    psi,
    run_rollout,
    window_from_metrics,
)
from serving.metrics import LATENCY_BUCKETS, SCORE_BUCKETS
from serving.router import route


def test_a_plan_rises_to_100_percent():
    assert RolloutPlan().steps == (0.05, 0.25, 0.5, 1.0)
    for steps in ((0.5, 0.25, 1.0), (0.1, 0.5), (0.0, 1.0), (0.2, 0.2, 1.0), ()):
        with pytest.raises(RolloutError, match="rollout steps|last rollout step"):
            RolloutPlan(steps=steps)
    with pytest.raises(RolloutError, match="max_wait_s"):
        RolloutPlan(hold_s=60, max_wait_s=30)


def test_the_quantile_reads_buckets_as_prometheus_does():
    buckets = {0.005: 50.0, 0.01: 90.0, 0.05: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.005)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + 0.04 * 0.9)
    assert histogram_quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None
    assert histogram_quantile(0.99, {0.1: 1.0, float("inf"): 10.0}) == 0.1  # beyond the top bound: the top bound
    same = {0.5: 10.0, 1.0: 20.0, float("inf"): 20.0}
    assert psi(same, same) == pytest.approx(0.0)
    assert psi(same, {0.5: 19.0, 1.0: 20.0, float("inf"): 20.0}) > 0.25


def test_the_service_metrics_text_gives_a_versions_totals():
    text = "\n".join([
        '# TYPE flywheel_predictions_total counter',
        'flywheel_predictions_total{model_version="2",variant="challenger"} 40.0',
        'flywheel_predictions_total{model_version="1",variant="champion"} 900.0',
        '# TYPE flywheel_variant_errors_total counter',
        'flywheel_variant_errors_total{model_version="2",variant="challenger"} 3.0',
        '# TYPE flywheel_prediction_latency_seconds histogram',
        'flywheel_prediction_latency_seconds_bucket{le="0.01",model_version="2",variant="challenger"} 30.0',
        'flywheel_prediction_latency_seconds_bucket{le="+Inf",model_version="2",variant="challenger"} 40.0',
        'flywheel_prediction_latency_seconds_count{model_version="2",variant="challenger"} 40.0',
        'flywheel_prediction_latency_seconds_sum{model_version="2",variant="challenger"} 0.9',
        '# TYPE flywheel_prediction_score histogram',
        'flywheel_prediction_score_bucket{le="0.5",model_version="2",variant="challenger"} 25.0',
        'flywheel_prediction_score_bucket{le="+Inf",model_version="2",variant="challenger"} 40.0', ""])
    window = window_from_metrics(text, "2")
    assert (window.requests, window.errors, window.attempts) == (40, 3, 43)
    assert window.latency_buckets == {0.01: 30.0, float("inf"): 40.0} and window.score_buckets[0.5] == 25.0
    assert window_from_metrics(text, "1").requests == 900
    assert window.minus(VariantWindow(10, 1, {0.01: 10.0, float("inf"): 10.0}, {})).latency_buckets == {
        0.01: 20.0, float("inf"): 30.0}


def test_a_step_waits_for_traffic_and_rolls_back_when_there_is_none():
    plan = RolloutPlan(hold_s=60, min_requests=100, max_wait_s=600)
    few = VariantWindow(requests=20)
    assert analyse(plan, 0, few, VariantWindow(requests=500), elapsed_s=120).verdict == "wait"
    assert analyse(plan, 0, VariantWindow(requests=200), VariantWindow(requests=500), elapsed_s=30).verdict == "wait"
    starved = analyse(plan, 0, few, VariantWindow(requests=500), elapsed_s=600)
    assert starved.verdict == "breach" and "too little traffic" in starved.reason


# ------------------------------------------------------------------ a simulated service
class Simulation:
    """A service under steady traffic (``rps`` requests a second, one record each, random
    routing keys through the real router at the current share) with a champion and a
    challenger of known behaviour, and a clock that moves only when the rollout sleeps.
    A challenger's failure is answered by the champion, as the service does."""

    def __init__(self, error_rate: float = 0.0, extra_latency_s: float = 0.0, challenger_auc: float = 0.70,
                 rps: float = 40.0, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.error_rate, self.extra_latency_s, self.rps = error_rate, extra_latency_s, rps
        self.auc = {"champion": 0.70, "challenger": challenger_auc}
        self.share, self.now = 0.0, 0.0
        self.total = {"champion": VariantWindow(), "challenger": VariantWindow()}
        self.labelled: dict[str, list[np.ndarray]] = {"champion": [], "challenger": []}
        self.shares: list[float] = []
        self.outcome: tuple[str, str] | None = None
        self.recorded: list[StepAnalysis] = []

    # the clock
    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        from scipy.stats import norm

        n = int(self.rps * seconds)
        to_challenger = np.array([route(self.rng.bytes(8).hex(), self.share, True)[0] == "challenger"
                                  for _ in range(n)], dtype=bool)
        failed = to_challenger & (self.rng.random(n) < self.error_rate)
        self.total["challenger"].errors += int(failed.sum())
        to_challenger &= ~failed  # the champion answers those: the client gets a prediction
        labels = (self.rng.random(n) < 0.2).astype(float)
        noise, latency = self.rng.normal(size=n), self.rng.lognormal(np.log(0.004), 0.3, n)
        for variant, mask in (("champion", ~to_challenger), ("challenger", to_challenger)):
            separation = np.sqrt(2) * norm.ppf(self.auc[variant])
            scores = 1 / (1 + np.exp(-(separation * labels[mask] + noise[mask])))
            took = latency[mask] + (self.extra_latency_s if variant == "challenger" else 0.0)
            window = self.total[variant]
            window.requests += int(mask.sum())
            for bound in (*LATENCY_BUCKETS, float("inf")):
                window.latency_buckets[bound] = window.latency_buckets.get(bound, 0.0) + float((took <= bound).sum())
            for bound in (*SCORE_BUCKETS, float("inf")):
                window.score_buckets[bound] = window.score_buckets.get(bound, 0.0) + float((scores <= bound).sum())
            self.labelled[variant].append(np.column_stack([labels[mask], scores]))
        self.now += seconds

    # the target
    def set_share(self, share: float, reason: str) -> None:
        self.share = share
        self.shares.append(share)

    def totals(self) -> tuple[VariantWindow, VariantWindow]:
        def copy(w: VariantWindow) -> VariantWindow:
            return VariantWindow(w.requests, w.errors, dict(w.latency_buckets), dict(w.score_buckets))
        return copy(self.total["champion"]), copy(self.total["challenger"])

    def online(self):
        arms = {v: np.concatenate(rows) if rows else np.empty((0, 2)) for v, rows in self.labelled.items()}
        if min(len(a) for a in arms.values()) < 300:
            return None
        return decide("classification", Arm("champion", "1", arms["champion"][:, 0], arms["champion"][:, 1]),
                      Arm("challenger", "2", arms["challenger"][:, 0], arms["challenger"][:, 1]), 300)

    def rollback(self, reason: str) -> None:
        self.outcome = ("rolled_back", reason)
        self.share = 0.0

    def promote(self, reason: str) -> None:
        self.outcome = ("promoted", reason)

    def record(self, analysis: StepAnalysis) -> None:
        self.recorded.append(analysis)


PLAN = RolloutPlan(hold_s=300, min_requests=100, max_wait_s=3600)


def test_a_better_challenger_goes_through_every_step_and_is_promoted():
    for seed in range(3):
        simulation = Simulation(challenger_auc=0.75, seed=seed)
        outcome = run_rollout(PLAN, simulation, clock=simulation, poll_s=30)
        assert outcome.outcome == "promoted" and simulation.outcome[0] == "promoted", outcome.reason
        assert simulation.shares == [0.05, 0.25, 0.5, 1.0]
        assert [s.verdict for s in outcome.steps] == ["pass"] * 4
        checked = {c.name for s in outcome.steps[:3] for c in s.checks}
        assert checked >= {"error rate", "p99 latency", "score PSI", "online metric"}, checked
        assert outcome.steps[-1].champion_requests > 0  # 100% is judged against the champion's last window


@pytest.mark.parametrize("fault,check", [({"error_rate": 0.05}, "error rate"),
                                         ({"extra_latency_s": 0.050}, "p99 latency")])
def test_a_faulty_challenger_is_rolled_back_at_the_first_step(fault, check):
    for seed in range(3):
        simulation = Simulation(seed=seed, **fault)
        outcome = run_rollout(PLAN, simulation, clock=simulation, poll_s=10)
        assert outcome.outcome == "rolled_back" and len(outcome.steps) == 1, outcome.reason
        assert simulation.shares == [0.05] and simulation.share == 0.0
        failed = [c.name for c in outcome.steps[0].checks if not c.passed]
        assert failed == [check], outcome.reason
        assert "step 1 (5%) breached" in outcome.reason and simulation.recorded == outcome.steps


def test_a_challenger_worse_on_ground_truth_is_rolled_back():
    simulation = Simulation(challenger_auc=0.55, seed=1, rps=60)
    outcome = run_rollout(PLAN, simulation, clock=simulation, poll_s=10)
    assert outcome.outcome == "rolled_back", outcome.reason
    assert any(c.name == "online metric" and not c.passed for c in outcome.steps[-1].checks), outcome.reason


def test_a_slow_model_does_not_hold_up_another_models_batches():
    """The batcher's lanes: a challenger taking 200 ms a call does not delay the champion's."""
    from serving.batcher import Batcher

    def score(key, rows):
        time.sleep(0.2 if key == "slow" else 0.001)
        return rows

    batcher = Batcher(score)

    async def main():
        slow = asyncio.ensure_future(batcher.submit("slow", [1]))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        await batcher.submit("fast", [2])
        fast_s = time.perf_counter() - started
        await slow
        return fast_s

    assert asyncio.run(main()) < 0.1
