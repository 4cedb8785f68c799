"""Registry work: the current champion as a scored model, lineage tags, registration."""

from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE, NONE

from core.events import MODEL_PROMOTED, MODEL_REGISTERED, MODEL_ROLLED_BACK, model_resource
from core.lineage import Lineage
from core.registry import CHALLENGER, CHAMPION, AliasEvent, Registry, RegistryError, load_version
from core.training import TrainingConfig


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def champion(registry: Registry, name: str) -> tuple[Any, Any, Any] | None:
    """(model version, model, stats) of the current champion, or None."""
    version = registry.version_by_alias(name, CHAMPION)
    if version is None:
        return None
    loaded = load_version(registry, name, version, require_hash=False)
    return version, loaded.model, loaded.stats


@dataclass
class RecordedTraining:
    """What a registered version records about how it was trained (``--reproduce`` reads it)."""

    version: str
    feature_version: int
    family: str
    hyperparameters: dict[str, Any]
    training: TrainingConfig
    epochs_trained: int
    metrics: dict[str, float]


def recorded_training(registry: Registry, name: str, version: str, use_gpu: bool = False) -> RecordedTraining:
    """A registered version's recorded training; a clear error if there is no such version or it
    lacks the lineage tags (registered by something other than the train flow)."""
    from core.errors import FlywheelError

    try:
        found = registry.client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - MlflowException
        raise FlywheelError(f"no registered version {version} of {name}: {exc}") from None
    lineage = Lineage.from_tags(found.tags)
    missing = lineage.missing("hyperparameters", "feature_version", "epochs_trained", "metrics", "seed", "num_workers")
    if missing:
        raise FlywheelError(f"{name} version {version} has no recorded {', '.join(missing)}: it was not "
                            "registered by the train flow, so it cannot be reproduced")
    assert lineage.epochs_trained is not None and lineage.feature_version is not None  # missing() checked them
    training = (TrainingConfig.model_validate(lineage.training) if lineage.training is not None
                else TrainingConfig(trials=1, max_epochs=lineage.epochs_trained, seed=lineage.seed,
                                    num_workers=lineage.num_workers))
    # Versions registered before model families were all the network.
    family = lineage.family_path or lineage.family or "tabular_net"
    return RecordedTraining(str(found.version), lineage.feature_version, family, lineage.hyperparameters,
                            training.model_copy(update={"use_gpu": use_gpu}), lineage.epochs_trained,
                            lineage.metrics)


def register_version(registry: Registry, name: str, source: str, run_id: str, tags: dict[str, str],
                     reason: str) -> tuple[str, list[str]]:
    """Register a version as ``challenger`` (and ``champion`` when there is none), all or
    nothing; returns (version, aliases)."""
    from core.registry import CHALLENGER

    aliases = [CHALLENGER] + ([] if registry.version_by_alias(name, CHAMPION) else [CHAMPION])
    version = registry.register(name, source, run_id, tags, aliases, reason=reason)
    return str(version.version), aliases


def register_trained(registry: Registry, model_name: str, run: Any, tags: dict[str, str], data: Any, outcome: Any,
                     exported: dict[str, Any], evaluation: Any, training: Any, should_register: bool,
                     flow_run_id: str) -> tuple[str | None, list[str]]:
    """Register the winner with its whole lineage when the gate said so (``evaluation.decision``)
    and the run may register; (version, aliases), or (None, []) with the reason logged."""
    import logging

    log = logging.getLogger(__name__)
    decision, best = evaluation.decision, outcome.best
    if not should_register:
        log.info("--no-register: the model is tracked in MLflow but not registered")
        return None, []
    if not decision.register:
        log.warning("not registered: the winner does not beat the prior baseline by the margin, or is worse than "
                    "the champion by more than it")
        return None, []
    model, weights_sha = exported[best.family]
    lineage = Lineage(
        git_commit=tags["mlflow.source.git.commit"], raw_tables=data.raw_tables, feature_uri=data.feature_uri,
        feature_version=data.feature_version, feature_stats_sha256=data.stats.fingerprint(),
        hyperparameters=best.hyperparameters, family=model.family_name, family_path=best.family,
        competition=decision.reasons[0], family_metrics={s.family: s.scored.metrics for s in evaluation.families},
        metrics=evaluation.candidate.metrics, baselines={b.name: b.metrics for b in evaluation.baselines},
        prefect_flow_run_id=flow_run_id, mlflow_run_id=run.info.run_id, weights_sha256=weights_sha,
        epochs_trained=outcome.epochs_trained, seed=training.seed, num_workers=training.num_workers,
        training=training.model_dump(exclude={"fault", "use_gpu"}), dataset=data.dataset, decision=decision.reasons,
        champion_metrics=evaluation.champion.metrics if evaluation.champion else {}).to_tags()
    return register_version(registry, model_name, f"{run.info.artifact_uri}/model", run.info.run_id, lineage,
                            reason=f"trained by flow run {flow_run_id}; " + "; ".join(decision.reasons))


def announce_registered(name: str, version: str, aliases: list[str], metrics: dict[str, float],
                        feature_version: int, dataset: str) -> None:
    """The ``flywheel.model.registered`` Prefect event (automations deploy or compare on it)."""
    from prefect.events import emit_event

    emit_event(MODEL_REGISTERED,
               resource=model_resource(name),
               payload={"dataset": dataset, "version": version, "aliases": aliases, "metrics": metrics,
                        "feature_version": feature_version})


# Registry reads and writes are retried: registration is all-or-nothing (undone on failure),
# so a retry never leaves a half-registered version.
def promote(registry: Registry, model_name: str, version: int | None, alias: str, reason: str) -> AliasEvent:
    """Move ``alias`` to ``version`` (None: the challenger, which must exist and differ from the
    champion), recorded in the alias history, and emit ``flywheel.model.promoted``."""
    from prefect.events import emit_event

    if version is None:
        aliases = registry.aliases(model_name)
        challenger = aliases.get(CHALLENGER)
        if challenger is None:
            raise RegistryError(f"{model_name} has no challenger to promote")
        if challenger == aliases.get(CHAMPION):
            raise RegistryError(f"{model_name} version {challenger} is already the champion")
        version = int(challenger)
    event = registry.promote(model_name, str(version), alias, reason)
    emit_event(MODEL_PROMOTED, resource=model_resource(model_name), payload=asdict(event))
    return event


def rollback(registry: Registry, model_name: str, alias: str, reason: str) -> AliasEvent:
    """Move ``alias`` back to the version it pointed to before, recorded, and emit
    ``flywheel.model.rolled_back``."""
    from prefect.events import emit_event

    event = registry.rollback(model_name, alias, reason)
    emit_event(MODEL_ROLLED_BACK, resource=model_resource(model_name), payload=asdict(event))
    return event


champion_task = task(name="load champion", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)(champion)
register_trained_task = task(name="register model", retries=2, retry_delay_seconds=2,
                             cache_policy=NO_CACHE)(register_trained)
register_task = task(name="register version", retries=2, retry_delay_seconds=2,
                     cache_policy=NO_CACHE)(register_version)
recorded_training_task = task(name="read recorded training", retries=2, retry_delay_seconds=2,
                              cache_policy=NO_CACHE)(recorded_training)
announce_task = task(name="announce registered model", retries=2, retry_delay_seconds=1,
                     cache_policy=NO_CACHE)(announce_registered)
# The registry is a collaborator, not data: nothing to hash into a cache key.
promote_task = task(name="promote", cache_policy=NONE)(promote)
rollback_task = task(name="rollback", cache_policy=NONE)(rollback)
