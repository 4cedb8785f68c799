"""Prefect tasks of the evaluate flow, around ``core.ab`` (the A/B decision): the labelled
arms, the decision's record and publication, and carrying it out."""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE, NONE

from core.ab import (
    Decision,
    Trial,
    judge,
    labelled_arms,
    looks_so_far,
    record_decision,
    summary,
    under_test,
)
from core.allocation import Allocation, bandit_step
from core.artifacts import artifact_key
from core.events import AB_DECIDED, model_resource
from core.registry import CHALLENGER, Registry
from core.settings import Settings
from serving.control import reload_service, running
from tasks.registry import promote, rollback

__all__ = ["judge"]  # for the flow, which imports no library layer but core

log = logging.getLogger(__name__)


def trial(registry: Registry, model_name: str) -> Trial:
    """What is under test now (``core.ab.under_test`` on the registry's aliases and history)."""
    registry.require(model_name)
    return under_test(model_name, registry.aliases(model_name), registry.history(model_name))


def publish(registry: Registry, model_name: str, decision: Decision) -> None:
    """The decision on both versions (tag ``flywheel.ab_decision``), as an artifact, and as the
    event ``flywheel.ab.decided``."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.events import emit_event

    log.info("A/B decision: %s: %s", decision.action, decision.reason)
    record_decision(registry, model_name, decision)
    create_markdown_artifact(summary(model_name, decision), key=artifact_key("ab", model_name),
                             description=f"A/B decision: {decision.action}")
    emit_event(AB_DECIDED, resource=model_resource(model_name), payload=decision.as_dict())


def allocate(settings: Settings, registry: Registry, model_name: str, task_kind: str, under: Trial,
             arms: dict) -> Allocation | None:
    """``serving.allocation: thompson``: the challenger's share from the arms' rewards
    (``core.allocation.bandit_step``), set on the registered model for every service worker."""
    allocation = bandit_step(settings.serving.allocation, task_kind, under, arms, settings.serving.allocation_floor)
    if allocation is not None:
        registry.set_allocation(model_name, allocation)
        log.info("allocation: %s", allocation.reason)
    return allocation


def carry_out(settings: Settings, registry: Registry, model_name: str, decision: Decision, under: Trial) -> bool:
    """Act on the decision; False when there was nothing to do (keep).

    - promote: the challenger becomes champion (recorded, evented) and the old champion stays
      under test as the challenger, rolled back to if it does better on the same traffic;
    - rollback: the predecessor comes back and leaves the test (the champion serves alone);
    - drop: the challenger alias goes back to the champion.
    The local service, if any, then reloads."""
    reason = f"A/B: {decision.reason}"[:500]
    if decision.action == "promote":
        promote(registry, model_name, None, "champion", reason)
        registry.move_alias(model_name, CHALLENGER, under.champion,
                            f"v{under.champion} stays under test after the promotion of v{under.testing}: rolled "
                            f"back to if it does better on the same traffic")
    elif decision.action == "rollback":
        rollback(registry, model_name, "champion", reason)
        registry.move_alias(model_name, CHALLENGER, str(under.predecessor), f"A/B: rolled back to v{under.predecessor}")
    elif decision.action == "drop" and decision.challenger is not None:
        registry.move_alias(model_name, CHALLENGER, under.champion, f"A/B dropped: {decision.reason}"[:500])
    else:
        return False
    served = running(settings, model_name)
    if served is not None:
        reload_service(served)
    return True




trial_task = task(name="what is under test", retries=2, retry_delay_seconds=2, cache_policy=NONE)(trial)
arms_task = task(name="join predictions and feedback", cache_policy=NO_CACHE)(labelled_arms)
publish_task = task(name="record decision", retries=2, retry_delay_seconds=2, cache_policy=NONE)(publish)
looks_task = task(name="looks so far", retries=2, retry_delay_seconds=2, cache_policy=NONE)(looks_so_far)
allocate_task = task(name="allocate traffic", retries=2, retry_delay_seconds=2, cache_policy=NONE)(allocate)
act_task = task(name="carry out decision", cache_policy=NONE)(carry_out)
