"""Evaluate: the online A/B decision on ground truth, acted on through the deploy flow.

``python -m flows.evaluate`` joins the logged predictions with their feedback per model
version and decides (``tasks.ab``): promote the challenger, keep testing, or drop it; and, for
a champion promoted from an earlier one, roll back if it does worse live than its predecessor
did. A faulty challenger (constant predictions) is dropped, never promoted. The decision, its
numbers and interval go to a Prefect artifact, to the tag ``flywheel.ab_decision`` on both
model versions and to the event ``flywheel.ab.decided``; ``--act`` (the default) carries it
out: a promotion or rollback through ``flows.deploy`` (recorded alias move, event, hot
reload), a drop by moving the challenger alias back to the champion (the service then serves
the champion alone).
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from pydantic import BaseModel, Field

from core.contract import load_contract
from core.registry import CHALLENGER, CHAMPION, Registry
from core.settings import get_settings
from flows._runtime import artifact_key, lake_for, main, model_name_for, run_started


class EvaluateParams(BaseModel):
    """Decide the champion/challenger A/B test on live ground truth (and act on it)."""

    dataset: str = Field("flights", description="Dataset whose A/B test is decided.")
    smoke_test: bool = Field(False, description="The smoke-test model and lake.")
    min_rows: int = Field(300, ge=10, description="Labelled predictions each variant needs before a decision.")
    margin: float = Field(0.0, ge=0, description="How much better the challenger must be (lower end of the interval).")
    act: bool = Field(True, description="Carry the decision out (--no-act: decide and record only).")


class EvaluateResult(BaseModel):
    model_name: str
    action: str
    reason: str
    decision: dict[str, Any]
    acted: bool


@flow(name="evaluate", log_prints=True)
def evaluate(params: EvaluateParams = EvaluateParams()) -> EvaluateResult:
    """Join predictions and feedback, decide with a bootstrap interval, record, act."""
    from tasks.ab import arms_task, decide, decide_rollback, record_task

    run_started()
    logger = get_run_logger()
    settings = get_settings()
    contract = load_contract(params.dataset)
    lake = lake_for(settings, params.smoke_test)
    model_name = model_name_for(contract.name, params.smoke_test)
    registry = Registry.for_uri(settings.tracking_uri)
    registry.require(model_name)
    aliases = registry.aliases(model_name)
    champion_version, challenger_version = aliases.get(CHAMPION), aliases.get(CHALLENGER)
    if champion_version is None:
        raise LookupError(f"{model_name} has no champion")
    testing = challenger_version if challenger_version and challenger_version != champion_version else None
    # After an A/B promotion the old champion stays under test as the challenger: the promoted
    # one is judged against it on the same traffic since the promotion (rolled back if worse).
    promotion = next((e for e in reversed(registry.history(model_name)) if e.alias == CHAMPION), None)
    predecessor = (testing if testing and promotion is not None and promotion.to_version == champion_version
                   and promotion.from_version == testing and promotion.kind != "rollback" else None)
    if predecessor and promotion is not None:
        arms = arms_task(lake, contract, since=promotion.at)
    else:
        arms = arms_task(lake, contract, overlap_with=testing)

    def arm(version: str, variant: str) -> Any:
        from tasks.ab import Arm

        return arms.get(version) or Arm(variant, version, _empty(), _empty())

    decision = None
    if predecessor:
        decision = decide_rollback(contract.task, arm(champion_version, "champion"), arm(predecessor, "challenger"),
                                   params.min_rows)
    elif testing:
        decision = decide(contract.task, arm(champion_version, "champion"), arm(testing, "challenger"),
                          params.min_rows, params.margin)
    if decision is None:
        reason = f"no challenger under test (champion v{champion_version})"
        logger.info(reason)
        return EvaluateResult(model_name=model_name, action="none", reason=reason, decision={}, acted=False)

    logger.info("A/B decision: %s: %s", decision.action, decision.reason)
    record_task(registry, model_name, decision)
    create_markdown_artifact(_summary(model_name, decision), key=artifact_key("ab", model_name),
                             description=f"A/B decision: {decision.action}")
    emit_event("flywheel.ab.decided", resource={"prefect.resource.id": f"flywheel.model.{model_name}",
                                                "prefect.resource.name": model_name},
               payload=decision.as_dict())
    acted = False
    if params.act and decision.action in ("promote", "rollback"):
        from flows.deploy import DeployParams, deploy

        deploy(DeployParams(action=decision.action, dataset=params.dataset, smoke_test=params.smoke_test,
                            reason=f"A/B: {decision.reason}"[:500]))
        if decision.action == "promote":
            registry.move_alias(model_name, CHALLENGER, champion_version,
                                f"v{champion_version} stays under test after the promotion of v{testing}: rolled "
                                f"back to if it does better on the same traffic")
        else:  # the demoted version leaves the test: the champion serves alone
            registry.move_alias(model_name, CHALLENGER, str(predecessor), f"A/B: rolled back to v{predecessor}")
        _reload(settings, model_name)
        acted = True
    elif params.act and decision.action == "drop" and decision.challenger is not None:
        registry.move_alias(model_name, CHALLENGER, champion_version, f"A/B dropped: {decision.reason}"[:500])
        _reload(settings, model_name)
        acted = True
    return EvaluateResult(model_name=model_name, action=decision.action, reason=decision.reason,
                          decision=decision.as_dict(), acted=acted)


def _empty() -> Any:
    import numpy as np

    return np.empty(0)


def _reload(settings: Any, model_name: str) -> None:
    from tasks.deploy import is_ours, read_state, reload_task

    served = read_state(settings, model_name)
    if served is not None and is_ours(served):
        reload_task(served)


def _summary(model_name: str, decision: Any) -> str:
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


def report(result: EvaluateResult) -> None:
    from rich.console import Console

    Console().print(f"{result.model_name}: [bold]{result.action}[/bold]{' (done)' if result.acted else ''}: "
                    f"{result.reason}")


if __name__ == "__main__":
    sys.exit(main(evaluate, EvaluateParams, sys.argv[1:], "python -m flows.evaluate", report))
