"""Registry work: the current champion as a scored model, lineage tags, registration."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

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
