"""Every Prefect event Flywheel emits, by name, and the resources they are about. The
automations in ``deployments/prefect.yaml`` listen for these names (``tests/test_events.py``
checks them against this module)."""

from __future__ import annotations

DATA_VALIDATED = "flywheel.data.validated"  # ingest wrote a batch (raw versions, quarantined rows)
DATA_REJECTED = "flywheel.data.rejected"  # ingest rejected a batch (the failed expectations)
MODEL_REGISTERED = "flywheel.model.registered"  # train registered a version (serve-registered reloads)
MODEL_PROMOTED = "flywheel.model.promoted"  # an alias moved forward (registry, deploy, evaluate)
MODEL_ROLLED_BACK = "flywheel.model.rolled_back"  # an alias moved back
AB_DECIDED = "flywheel.ab.decided"  # evaluate decided the A/B test
DRIFT_DETECTED = "flywheel.drift.detected"  # monitor: live inputs drifted (retrain on drift)
PERFORMANCE_DEGRADED = "flywheel.performance.degraded"  # monitor: live metric fell (retrain on performance)
ROLLOUT_STEP = "flywheel.rollout.step"  # a rollout step was analysed (its share, verdict and checks)
ROLLOUT_ROLLED_BACK = "flywheel.rollout.rolled_back"  # a rollout's analysis breached: the challenger left

EVENTS = frozenset({DATA_VALIDATED, DATA_REJECTED, MODEL_REGISTERED, MODEL_PROMOTED, MODEL_ROLLED_BACK,
                    AB_DECIDED, DRIFT_DETECTED, PERFORMANCE_DEGRADED, ROLLOUT_STEP, ROLLOUT_ROLLED_BACK})
MODEL_RESOURCE_PREFIX = "flywheel.model."
DATASET_RESOURCE_PREFIX = "flywheel.dataset."


def model_resource(model_name: str) -> dict[str, str]:
    """The resource of an event about a registered model (automations match on its id)."""
    return {"prefect.resource.id": f"{MODEL_RESOURCE_PREFIX}{model_name}", "prefect.resource.name": model_name}


def dataset_resource(dataset: str) -> dict[str, str]:
    """The resource of an event about a dataset."""
    return {"prefect.resource.id": f"{DATASET_RESOURCE_PREFIX}{dataset}", "prefect.resource.name": dataset}
