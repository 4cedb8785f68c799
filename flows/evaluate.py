"""Evaluate: the online A/B decision on ground truth, acted on through the deploy flow.

``python -m flows.evaluate`` joins the logged predictions with their feedback per model
version and decides (``core.ab``, an always-valid sequential test by default, so the
decision keeps its 5% error however often the deployment looks): promote the challenger, keep
testing, or drop it; and, for
a champion promoted from an earlier one, roll back if it does worse live than its predecessor
did. A faulty challenger (constant predictions) is dropped, never promoted. The decision, its
numbers, interval, evidence and look number go to a Prefect artifact, to the tag ``flywheel.ab_decision`` on both
model versions and to the event ``flywheel.ab.decided``; ``--act`` (the default) carries it
out: a promotion or rollback through ``flows.deploy`` (recorded alias move, event, hot
reload), a drop by moving the challenger alias back to the champion (the service then serves
the champion alone).
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from core.contract import load_contract
from core.registry import Registry
from core.settings import get_settings
from flows._runtime import lake_for, main, model_name_for, run_started


class EvaluateParams(BaseModel):
    """Decide the champion/challenger A/B test on live ground truth (and act on it)."""

    dataset: str = Field("flights", description="Dataset whose A/B test is decided.")
    smoke_test: bool = Field(False, description="The smoke-test model and lake.")
    min_rows: int = Field(300, ge=10, description="Labelled predictions each variant needs before a decision.")
    margin: float = Field(0.0, ge=0, description="How much better the challenger must be (lower end of the interval).")
    act: bool = Field(True, description="Carry the decision out (--no-act: decide and record only).")
    test: Literal["sequential", "bootstrap"] = Field(
        "sequential", description="sequential: an always-valid interval, right however often it is checked; "
        "bootstrap: a fixed 95% interval (for comparison: checked again and again it errs far more often).")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="The chance of a wrong promote or drop, over all looks.")


class EvaluateResult(BaseModel):
    model_name: str
    action: str
    reason: str
    decision: dict[str, Any]
    acted: bool
    allocation: float | None = None  # serving.allocation thompson: the challenger's new share


@flow(name="evaluate", log_prints=True)
def evaluate(params: EvaluateParams = EvaluateParams()) -> EvaluateResult:
    """Wires: what is under test (``core.ab.under_test``) -> its labelled arms -> the decision
    (``core.ab.judge``) -> its record, artifact and event -> carrying it out (``--act``)."""
    from tasks.ab import (
        act_task,
        allocate_task,
        arms_task,
        judge,
        looks_task,
        publish_task,
        trial_task,
    )

    run_started()
    settings = get_settings()
    contract = load_contract(params.dataset)
    model_name = model_name_for(contract.name, params.smoke_test)
    registry = Registry.for_uri(settings.tracking_uri)
    under = trial_task(registry, model_name)
    arms = arms_task(lake_for(settings, params.smoke_test), contract, **under.arm_filter())
    looks = looks_task(registry, model_name, under)
    decision = judge(contract.task, under, arms, params.min_rows, params.margin, params.test, params.alpha,
                     looks=looks + 1)
    if decision is None:
        reason = f"no challenger under test (champion v{under.champion})"
        get_run_logger().info(reason)
        return EvaluateResult(model_name=model_name, action="none", reason=reason, decision={}, acted=False)
    publish_task(registry, model_name, decision)
    allocation = allocate_task(settings, registry, model_name, contract.task, under, arms)
    acted = bool(params.act) and act_task(settings, registry, model_name, decision, under)
    return EvaluateResult(model_name=model_name, action=decision.action, reason=decision.reason,
                          decision=decision.as_dict(), acted=acted,
                          allocation=None if allocation is None else allocation.share)


def report(result: EvaluateResult) -> None:
    from rich.console import Console

    Console().print(f"{result.model_name}: [bold]{result.action}[/bold]{' (done)' if result.acted else ''}: "
                    f"{result.reason}")


if __name__ == "__main__":
    sys.exit(main(evaluate, EvaluateParams, sys.argv[1:], "python -m flows.evaluate", report))
