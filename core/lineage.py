"""What a registered model version records about how it was made: one typed model, written as
its MLflow tags (``flywheel.<field>``) by training and read back by every reader (serving, the
registry client, reproduction, maintenance), instead of tag names spelt in each."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

PREFIX = "flywheel."


class Lineage(BaseModel):
    """A version's lineage. Every field is optional when read: older versions lack some."""

    model_config = ConfigDict(extra="ignore")

    dataset: str | None = None
    git_commit: str | None = None
    raw_tables: dict[str, Any] = {}
    feature_uri: str | None = None
    feature_version: int | None = None
    feature_stats_sha256: str | None = None
    family: str | None = None  # the family's name (``Fitted.family_name``)
    family_path: str | None = None  # how the competition named it (a dotted path for a user's own)
    hyperparameters: dict[str, Any] = {}
    training: dict[str, Any] | None = None  # the TrainingConfig it ran with
    epochs_trained: int | None = None
    seed: int | None = None
    num_workers: int | None = None
    weights_sha256: str | None = None
    metrics: dict[str, float] = {}
    family_metrics: dict[str, dict[str, float]] = {}
    baselines: dict[str, dict[str, float]] = {}
    champion_metrics: dict[str, float] = {}
    competition: str | None = None
    decision: list[str] = []
    prefect_flow_run_id: str | None = None
    mlflow_run_id: str | None = None

    @staticmethod
    def tag(field: str) -> str:
        """The MLflow tag that holds ``field``."""
        if field not in Lineage.model_fields:
            raise KeyError(f"no lineage field {field!r}")
        return PREFIX + field

    def to_tags(self) -> dict[str, str]:
        """The tags to register: text and numbers as text, structures as sorted JSON; unset
        fields are left out."""
        out = {}
        for name, value in self.model_dump(exclude_none=True).items():
            out[self.tag(name)] = value if isinstance(value, str) else (
                str(value) if isinstance(value, int) else json.dumps(value, sort_keys=True, default=str))
        return out

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Lineage:
        """The lineage in a version's tags (other tags are ignored)."""
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            text = tags.get(PREFIX + name)
            if text is None:
                continue
            structured = field.annotation is not None and any(
                kind in str(field.annotation) for kind in ("dict", "list"))
            values[name] = json.loads(text) if structured else text
        return cls.model_validate(values)

    def missing(self, *fields: str) -> list[str]:
        """The tags of ``fields`` this version does not have."""
        return [self.tag(f) for f in fields if getattr(self, f) in (None, {}, [])]
