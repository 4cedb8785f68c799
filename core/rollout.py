"""Progressive rollout: the challenger's share goes through steps, each analysed against the
champion on the same window; a breach rolls back, the last step promotes.

Anchors: Argo Rollouts' analysis runs and Flagger's canary analysis (a metric check per step,
rollback on the first failed one), KServe's canary traffic percent. The steps' shares reach the
service through the registered model's allocation (``core.allocation``), which every worker
follows within ``serving.alias_poll_s``.

A step holds ``hold_s`` and until the challenger has answered ``min_requests`` in its window
(at most ``max_wait_s``: a challenger that gets too little traffic to judge is rolled back, not
promoted blind). Its analysis (``analyse``) compares the two variants on that window:

- **error rate**: challenger errors (the service answers them with the champion, so no request
  fails) over its requests, against the champion's plus ``max_error_rate_increase``;
- **p99 latency**, from the service's Prometheus histograms (as ``histogram_quantile`` reads
  them), against the champion's plus ``max_latency_increase_s``;
- **score shift**: the PSI between the two variants' score histograms, below ``max_psi``;
- **the online metric**, once both have ``min_labelled`` labelled predictions since the rollout
  began: the sequential A/B test (``core.ab``) must not find the challenger worse.

At 100% the champion gets no traffic: the last step is judged against the champion's figures
from the step before. Passing it promotes the challenger.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from core.errors import FlywheelError

Verdict = Literal["pass", "breach", "wait"]


class RolloutError(FlywheelError, ValueError):
    """A rollout cannot start: its plan is wrong, or there is no challenger to roll out."""


@dataclass(frozen=True)
class RolloutPlan:
    """The steps and the analysis' limits."""

    steps: tuple[float, ...] = (0.05, 0.25, 0.5, 1.0)
    hold_s: float = 300.0
    min_requests: int = 100
    max_wait_s: float = 1800.0
    max_error_rate_increase: float = 0.01
    max_latency_increase_s: float = 0.025
    max_psi: float = 0.25
    min_labelled: int = 300
    alpha: float = 0.05

    def __post_init__(self) -> None:
        steps = tuple(float(s) for s in self.steps)
        if not steps or any(not 0 < s <= 1 for s in steps) or list(steps) != sorted(set(steps)):
            raise RolloutError(f"rollout steps must rise strictly within (0, 1], e.g. 0.05 0.25 0.5 1; got {steps}")
        if steps[-1] != 1.0:
            raise RolloutError(f"the last rollout step must be 1 (100%): got {steps[-1]}")
        if self.max_wait_s < self.hold_s:
            raise RolloutError(f"max_wait_s ({self.max_wait_s}) must be at least hold_s ({self.hold_s})")
        object.__setattr__(self, "steps", steps)


@dataclass
class VariantWindow:
    """One variant's traffic over a step's window: counters and histogram buckets (cumulative
    counts per upper bound, as Prometheus keeps them), taken as the difference of two scrapes."""

    requests: int = 0  # answered by this variant
    errors: int = 0  # this variant failed (the champion answered instead)
    latency_buckets: dict[float, float] = field(default_factory=dict)
    score_buckets: dict[float, float] = field(default_factory=dict)

    @property
    def attempts(self) -> int:
        return self.requests + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.attempts if self.attempts else 0.0

    @property
    def p99_s(self) -> float | None:
        return histogram_quantile(0.99, self.latency_buckets)

    def minus(self, earlier: VariantWindow) -> VariantWindow:
        """This scrape's totals less an earlier one's: the window between them."""
        def delta(now: dict[float, float], then: dict[float, float]) -> dict[float, float]:
            return {le: max(count - then.get(le, 0.0), 0.0) for le, count in now.items()}
        return VariantWindow(self.requests - earlier.requests, self.errors - earlier.errors,
                             delta(self.latency_buckets, earlier.latency_buckets),
                             delta(self.score_buckets, earlier.score_buckets))


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` on cumulative buckets (linear within a bucket; the
    top finite bound when the quantile falls in +Inf). None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def psi(expected: dict[float, float], actual: dict[float, float], epsilon: float = 1e-4) -> float | None:
    """Population stability index between two cumulative histograms with the same bounds."""
    bounds = sorted(set(expected) & set(actual))
    if not bounds or expected[bounds[-1]] <= 0 or actual[bounds[-1]] <= 0:
        return None
    e = np.diff([0.0, *[expected[b] for b in bounds]]) / expected[bounds[-1]]
    a = np.diff([0.0, *[actual[b] for b in bounds]]) / actual[bounds[-1]]
    e, a = np.clip(e, epsilon, None), np.clip(a, epsilon, None)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class Check:
    name: str
    passed: bool
    value: float | None
    limit: float | None
    detail: str


@dataclass
class StepAnalysis:
    """One step's verdict: ``pass``, ``breach`` (roll back) or ``wait`` (not enough traffic)."""

    step: int
    share: float
    verdict: Verdict
    checks: list[Check]
    champion_requests: int
    challenger_requests: int
    elapsed_s: float

    @property
    def reason(self) -> str:
        failed = [c.detail for c in self.checks if not c.passed]
        if self.verdict == "breach":
            return "; ".join(failed)
        if self.verdict == "wait":
            return "; ".join(c.detail for c in self.checks) or "waiting"
        return "all checks passed: " + "; ".join(c.detail for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason}


def analyse(plan: RolloutPlan, step: int, challenger: VariantWindow, champion: VariantWindow,
            elapsed_s: float, online: Any = None) -> StepAnalysis:
    """The step's verdict on its window (``champion``: the same window's, or the previous
    step's at 100%); ``online``: the sequential A/B decision (``core.ab.Decision``) when both
    arms have enough ground truth, else None."""
    share = plan.steps[step]
    enough = challenger.attempts >= plan.min_requests and elapsed_s >= plan.hold_s
    if not enough:
        timed_out = elapsed_s >= plan.max_wait_s
        detail = (f"the challenger answered {challenger.attempts} of the {plan.min_requests} requests the step "
                  f"needs in {elapsed_s:.0f} s (hold {plan.hold_s:.0f} s)")
        if timed_out:
            return StepAnalysis(step, share, "breach", [Check("traffic", False, challenger.attempts,
                                                              plan.min_requests, f"too little traffic to judge: {detail}")],
                                champion.attempts, challenger.attempts, elapsed_s)
        return StepAnalysis(step, share, "wait", [Check("traffic", True, challenger.attempts, plan.min_requests,
                                                        detail)], champion.attempts, challenger.attempts, elapsed_s)
    checks = []
    limit = champion.error_rate + plan.max_error_rate_increase
    checks.append(Check("error rate", challenger.error_rate <= limit, challenger.error_rate, limit,
                        f"error rate {challenger.error_rate:.2%} ({challenger.errors}/{challenger.attempts}) vs "
                        f"champion {champion.error_rate:.2%}, limit {limit:.2%}"))
    mine, theirs = challenger.p99_s, champion.p99_s
    if mine is not None and theirs is not None:
        bound = theirs + plan.max_latency_increase_s
        checks.append(Check("p99 latency", mine <= bound, mine, bound,
                            f"p99 {mine * 1000:.1f} ms vs champion {theirs * 1000:.1f} ms, limit {bound * 1000:.1f} ms"))
    shift = psi(champion.score_buckets, challenger.score_buckets)
    if shift is not None and champion.requests >= plan.min_requests:
        checks.append(Check("score PSI", shift <= plan.max_psi, shift, plan.max_psi,
                            f"score PSI {shift:.3f} vs the champion's scores, limit {plan.max_psi}"))
    if online is not None and online.interval is not None:
        checks.append(Check("online metric", online.action != "drop", online.difference, 0.0,
                            f"{online.metric} on ground truth: {online.reason}"))
    verdict: Verdict = "pass" if all(c.passed for c in checks) else "breach"
    return StepAnalysis(step, share, verdict, checks, champion.attempts, challenger.attempts, elapsed_s)


def summary(model_name: str, challenger: str, champion: str, steps: list[StepAnalysis], outcome: str) -> str:
    """The rollout as Markdown: a row per analysed step (a Prefect artifact)."""
    lines = [f"# Rollout of {model_name} v{challenger} against champion v{champion}: **{outcome}**", "",
             "| step | share | verdict | challenger requests | champion requests | seconds | checks |",
             "|---|---|---|---|---|---|---|"]
    for s in steps:
        checks = "<br>".join(f"{'✓' if c.passed else '✗'} {c.detail}" for c in s.checks)
        lines.append(f"| {s.step + 1} | {s.share:.0%} | {s.verdict} | {s.challenger_requests} | "
                     f"{s.champion_requests} | {s.elapsed_s:.0f} | {checks} |")
    return "\n".join(lines)


LATENCY = "flywheel_prediction_latency_seconds"
SCORE = "flywheel_prediction_score"
ANSWERED = "flywheel_predictions_total"
FAILED = "flywheel_variant_errors_total"


def window_from_metrics(text: str, version: str) -> VariantWindow:
    """A model version's totals in the service's ``/metrics`` text (Prometheus' exposition
    format, every worker's values summed by the service): what it answered, how often it
    failed, and its latency and score histograms. The difference of two such readings
    (``VariantWindow.minus``) is a step's window."""
    from prometheus_client.parser import text_string_to_metric_families

    window = VariantWindow()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_version") != str(version):
                continue
            if sample.name == ANSWERED:
                window.requests += int(sample.value)
            elif sample.name == FAILED:
                window.errors += int(sample.value)
            elif sample.name == f"{LATENCY}_bucket":
                bound = float(sample.labels["le"])
                window.latency_buckets[bound] = window.latency_buckets.get(bound, 0.0) + sample.value
            elif sample.name == f"{SCORE}_bucket":
                bound = float(sample.labels["le"])
                window.score_buckets[bound] = window.score_buckets.get(bound, 0.0) + sample.value
    return window


class Target(Protocol):
    """What a rollout drives: the served model's share, its metrics, its ground truth, the
    registry's aliases. ``tasks.rollout.ServiceTarget`` is the real one (the registry and a
    running service); a simulation passes its own."""

    def set_share(self, share: float, reason: str) -> None: ...

    def totals(self) -> tuple[VariantWindow, VariantWindow]:
        """(champion, challenger) cumulative totals now."""
        ...

    def online(self) -> Any:
        """The sequential A/B decision on the ground truth since the rollout began, or None."""
        ...

    def rollback(self, reason: str) -> None: ...

    def promote(self, reason: str) -> None: ...

    def record(self, analysis: StepAnalysis) -> None:
        """The step's event and log line (the artifact is written at the end)."""
        ...


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    def monotonic(self) -> float:
        import time

        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        import time

        time.sleep(seconds)


def run_step(plan: RolloutPlan, step: int, target: Target, baseline: VariantWindow | None,
             clock: Clock, poll_s: float = 1.0) -> tuple[StepAnalysis, VariantWindow]:
    """Set the step's share, then look every ``poll_s`` until the analysis passes or breaches.
    Returns the analysis and the champion's window (the next step's baseline at 100%)."""
    share = plan.steps[step]
    target.set_share(share, f"rollout step {step + 1} of {len(plan.steps)}: {share:.0%}")
    start, started = target.totals(), clock.monotonic()
    while True:
        clock.sleep(poll_s)
        champion_now, challenger_now = target.totals()
        champion = champion_now.minus(start[0])
        challenger = challenger_now.minus(start[1])
        compared = baseline if share >= 1.0 and baseline is not None else champion
        elapsed = clock.monotonic() - started
        analysis = analyse(plan, step, challenger, compared, elapsed)
        if analysis.verdict != "wait" and analysis.checks[0].name != "traffic":
            # The ground truth (a read of the prediction log) only when the step is judged.
            analysis = analyse(plan, step, challenger, compared, elapsed, target.online())
        if analysis.verdict != "wait":
            target.record(analysis)
            return analysis, champion


@dataclass
class RolloutOutcome:
    outcome: Literal["promoted", "rolled_back"]
    steps: list[StepAnalysis]
    reason: str


def run_rollout(plan: RolloutPlan, target: Target, clock: Clock | None = None, poll_s: float = 1.0,
                step_runner: Any = None) -> RolloutOutcome:
    """Every step in turn (``step_runner``, ``run_step`` by default: the flow passes it as a
    Prefect task, so each step is a task run); the first breach rolls back, the last step's
    pass promotes. Any failure of the rollout itself (a crash, a kill) leaves the registry's
    aliases as they were; the share it set applies only to this challenger."""
    runner = step_runner or run_step
    clock = clock or RealClock()
    done: list[StepAnalysis] = []
    baseline: VariantWindow | None = None
    for step in range(len(plan.steps)):
        analysis, champion = runner(plan, step, target, baseline, clock, poll_s)
        done.append(analysis)
        if analysis.verdict == "breach":
            reason = f"step {step + 1} ({analysis.share:.0%}) breached: {analysis.reason}"
            target.rollback(reason)
            return RolloutOutcome("rolled_back", done, reason)
        if champion.attempts:
            baseline = champion
    reason = f"all {len(plan.steps)} steps passed"
    target.promote(reason)
    return RolloutOutcome("promoted", done, reason)


def window_from_prometheus(url: str, model_name: str, version: str, timeout_s: float = 10.0) -> VariantWindow:
    """The same totals from a Prometheus server: every instance it scrapes of the service of
    ``model_name`` (the target's ``model`` label, written by ``flows.deploy``), summed."""
    import re

    import requests

    for value in (model_name, str(version)):
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", value):
            raise RolloutError(f"cannot select {value!r} in a Prometheus query")
    selector = f'{{model="{model_name}",model_version="{version}"}}'

    def query(expression: str) -> list[dict[str, Any]]:
        answer = requests.get(f"{url.rstrip('/')}/api/v1/query", params={"query": expression}, timeout=timeout_s)
        answer.raise_for_status()
        return answer.json()["data"]["result"]

    def total(metric: str) -> int:
        found = query(f"sum({metric}{selector})")
        return int(float(found[0]["value"][1])) if found else 0

    def buckets(metric: str) -> dict[float, float]:
        return {float(r["metric"]["le"]): float(r["value"][1])
                for r in query(f"sum by (le) ({metric}_bucket{selector})")}

    return VariantWindow(total(ANSWERED), total(FAILED), buckets(LATENCY), buckets(SCORE))
