"""Prefect tasks of the rollout flow, around ``core.rollout``: the real target (the registry's
allocation and aliases, the running service's ``/metrics``, the ground truth in the lake), each
step as a task run, and the rollout's artifact."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from core.ab import decide, labelled_arms
from core.allocation import Allocation
from core.artifacts import artifact_key
from core.contract import DatasetContract
from core.events import MODEL_PROMOTED, ROLLOUT_ROLLED_BACK, ROLLOUT_STEP, model_resource
from core.lake import Lake
from core.registry import CHALLENGER, CHAMPION, Registry
from core.rollout import (
    RolloutOutcome,
    RolloutPlan,
    StepAnalysis,
    VariantWindow,
    run_step,
    summary,
    window_from_metrics,
    window_from_prometheus,
)
from serving.control import Served, reload_service

log = logging.getLogger(__name__)


class ServiceTarget:
    """A rollout of the registry's challenger on a running service (``core.rollout.Target``)."""

    def __init__(self, registry: Registry, model_name: str, served: Served, lake: Lake, contract: DatasetContract,
                 plan: RolloutPlan, prometheus_url: str | None = None):
        aliases = registry.aliases(model_name)
        champion, challenger = aliases.get(CHAMPION), aliases.get(CHALLENGER)
        if champion is None or challenger is None or challenger == champion:
            from core.rollout import RolloutError

            raise RolloutError(f"{model_name} has no challenger to roll out (champion v{champion}, challenger "
                               f"v{challenger}): train or register one first")
        self.registry, self.model_name, self.served = registry, model_name, served
        self.lake, self.contract, self.plan = lake, contract, plan
        self.prometheus_url = prometheus_url  # None: the service's own /metrics
        self.champion, self.challenger = champion, challenger
        self.started = datetime.now(UTC)

    def set_share(self, share: float, reason: str) -> None:
        self.registry.set_allocation(self.model_name, Allocation(share, self.challenger, "rollout", reason))
        log.info("rollout of %s v%s: %s", self.model_name, self.challenger, reason)

    def totals(self) -> tuple[VariantWindow, VariantWindow]:
        import requests

        if self.prometheus_url:
            return (window_from_prometheus(self.prometheus_url, self.model_name, self.champion),
                    window_from_prometheus(self.prometheus_url, self.model_name, self.challenger))

        response = requests.get(f"{self.served.url}/metrics", timeout=30)
        response.raise_for_status()
        return window_from_metrics(response.text, self.champion), window_from_metrics(response.text, self.challenger)

    def online(self) -> Any:
        arms = labelled_arms(self.lake, self.contract, since=self.started)
        champion, challenger = arms.get(self.champion), arms.get(self.challenger)
        if champion is None or challenger is None:
            return None
        decision = decide(self.contract.task, champion, challenger, self.plan.min_labelled, alpha=self.plan.alpha)
        return decision if decision.interval is not None else None

    def rollback(self, reason: str) -> None:
        from prefect.events import emit_event

        event = self.registry.move_alias(self.model_name, CHALLENGER, self.champion,
                                         f"rollout rolled back: {reason}"[:500])
        emit_event(ROLLOUT_ROLLED_BACK, resource=model_resource(self.model_name),
                   payload={**asdict(event), "challenger": self.challenger, "reason": reason})
        reload_service(self.served)

    def promote(self, reason: str) -> None:
        from prefect.events import emit_event

        event = self.registry.promote(self.model_name, self.challenger, CHAMPION, f"rollout: {reason}"[:500])
        emit_event(MODEL_PROMOTED, resource=model_resource(self.model_name), payload=asdict(event))
        # A finished rollout serves the new champion alone (``flows.deploy rollback`` brings the old back).
        self.registry.move_alias(self.model_name, CHALLENGER, self.challenger, "rollout finished: served alone")
        reload_service(self.served)

    def record(self, analysis: StepAnalysis) -> None:
        from prefect.events import emit_event

        log.info("rollout step %d (%.0f%%): %s: %s", analysis.step + 1, analysis.share * 100, analysis.verdict,
                 analysis.reason)
        emit_event(ROLLOUT_STEP, resource=model_resource(self.model_name),
                   payload={"challenger": self.challenger, "champion": self.champion, **analysis.as_dict()})


def publish(target: ServiceTarget, outcome: RolloutOutcome) -> None:
    """The rollout's steps as a Markdown artifact, a row each."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(summary(target.model_name, target.challenger, target.champion, outcome.steps,
                                     outcome.outcome), key=artifact_key("rollout", target.model_name),
                             description=f"rollout: {outcome.outcome}")


step_task = task(name="rollout step", cache_policy=NONE, task_run_name="rollout step {step}")(run_step)
publish_task = task(name="rollout artifact", retries=2, retry_delay_seconds=2, cache_policy=NONE)(publish)
