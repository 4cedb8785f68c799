"""Registry work: the current champion as a scored model, lineage tags, registration."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.registry import CHAMPION, Registry

log = logging.getLogger(__name__)


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


def load_registered(registry: Registry, name: str, version: Any) -> tuple[Any, Any]:
    """Download a version's artifacts, verify the weights' hash, rebuild the model.

    Returns (model, feature stats)."""
    import mlflow

    from core.features import FeatureStats
    from core.model import STATS_FILE, load_model

    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                      tracking_uri=registry.client._tracking_client.tracking_uri))
    model = load_model(folder, version.tags.get("flywheel.weights_sha256"))
    return model, FeatureStats.from_json((folder / STATS_FILE).read_text())


def champion(registry: Registry, name: str) -> tuple[Any, Any, Any] | None:
    """(model version, model, stats) of the current champion, or None."""
    version = registry.version_by_alias(name, CHAMPION)
    if version is None:
        return None
    model, stats = load_registered(registry, name, version)
    return version, model, stats


def lineage_tags(**values: Any) -> dict[str, str]:
    """Model version tags: strings, JSON for structures, prefixed ``flywheel.``."""
    return {f"flywheel.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            for k, v in values.items()}


def register_version(registry: Registry, name: str, source: str, run_id: str, tags: dict[str, str],
                     reason: str) -> tuple[str, list[str]]:
    """Register a version as ``challenger`` (and ``champion`` when there is none), all or
    nothing; returns (version, aliases)."""
    from core.registry import CHALLENGER

    aliases = [CHALLENGER] + ([] if registry.version_by_alias(name, CHAMPION) else [CHAMPION])
    version = registry.register(name, source, run_id, tags, aliases, reason=reason)
    return str(version.version), aliases


def announce_registered(name: str, version: str, aliases: list[str], metrics: dict[str, float],
                        feature_version: int) -> None:
    """The ``flywheel.model.registered`` Prefect event (automations deploy or compare on it)."""
    from prefect.events import emit_event

    emit_event("flywheel.model.registered",
               resource={"prefect.resource.id": f"flywheel.model.{name}", "prefect.resource.name": name},
               payload={"version": version, "aliases": aliases, "metrics": metrics,
                        "feature_version": feature_version})


# Registry reads and writes are retried: registration is all-or-nothing (undone on failure),
# so a retry never leaves a half-registered version.
champion_task = task(name="load champion", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)(champion)
register_task = task(name="register model", retries=2, retry_delay_seconds=2,
                     cache_policy=NO_CACHE)(register_version)
announce_task = task(name="announce registered model", retries=2, retry_delay_seconds=1,
                     cache_policy=NO_CACHE)(announce_registered)
