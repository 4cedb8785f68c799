"""The model registry (MLflow) with champion/challenger aliases and a recorded alias history.

Every alias move is written to the registered model as a tag ``alias_event.<n>`` holding who,
when, which alias, from which version to which, and why, so a rollback knows the previous
champion and a person can read the history in the MLflow UI. ``register`` is all-or-nothing:
if any step fails, the new version, its alias moves and their events are undone.
"""

from __future__ import annotations

import getpass
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
EVENT_PREFIX = "alias_event."


@dataclass(frozen=True)
class AliasEvent:
    seq: int
    alias: str
    from_version: str | None
    to_version: str | None
    actor: str
    at: str
    reason: str


class RegistryError(RuntimeError):
    """A registry operation could not be done (nothing was changed)."""


class Registry:
    """Thin layer over ``mlflow.MlflowClient`` for one tracking server."""

    def __init__(self, client: Any, actor: str | None = None):
        self.client = client
        self.actor = actor or _whoami()

    @classmethod
    def for_uri(cls, tracking_uri: str, actor: str | None = None) -> Registry:
        from mlflow import MlflowClient

        return cls(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), actor)

    # ------------------------------------------------------------------ reading
    def exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            return False
        return True

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version (empty when the model does not exist)."""
        if not self.exists(name):
            return {}
        return {alias: str(version) for alias, version in self.client.get_registered_model(name).aliases.items()}

    def version_by_alias(self, name: str, alias: str) -> Any | None:
        version = self.aliases(name).get(alias)
        return self.client.get_model_version(name, version) if version else None

    def history(self, name: str) -> list[AliasEvent]:
        if not self.exists(name):
            return []
        tags = self.client.get_registered_model(name).tags
        events = [AliasEvent(**json.loads(v)) for k, v in tags.items() if k.startswith(EVENT_PREFIX)]
        return sorted(events, key=lambda e: e.seq)

    # ------------------------------------------------------------------ writing
    def move_alias(self, name: str, alias: str, version: str, reason: str) -> AliasEvent:
        """Point ``alias`` at ``version`` and record the move."""
        previous = self.aliases(name).get(alias)
        self.client.set_registered_model_alias(name, alias, str(version))
        return self._record(name, alias, previous, str(version), reason)

    def _record(self, name: str, alias: str, previous: str | None, version: str | None, reason: str) -> AliasEvent:
        seq = len(self.history(name)) + 1
        event = AliasEvent(seq, alias, previous, version, self.actor,
                           datetime.now(UTC).isoformat(timespec="seconds"), reason)
        self.client.set_registered_model_tag(name, f"{EVENT_PREFIX}{seq:06d}", json.dumps(event.__dict__))
        log.info("registry: %s@%s %s -> %s (%s)", name, alias, previous, version, reason)
        return event

    def register(self, name: str, source: str, run_id: str, tags: dict[str, str],
                 aliases: list[str], reason: str, description: str = "") -> Any:
        """Create a model version and move ``aliases`` to it, all or nothing."""
        created_model = not self.exists(name)
        before = self.aliases(name)
        events_before = len(self.history(name))
        version = None
        try:
            if created_model:
                self.client.create_registered_model(name, description=description)
            version = self.client.create_model_version(name, source, run_id=run_id, tags=tags,
                                                       description=description)
            for alias in aliases:
                self.move_alias(name, alias, version.version, reason)
            return version
        except BaseException as exc:
            self._undo(name, created_model, before, events_before, version)
            if isinstance(exc, Exception):
                raise RegistryError(f"registering {name} failed and was undone: {exc}") from exc
            raise

    def _undo(self, name: str, created_model: bool, before: dict[str, str], events_before: int,
              version: Any | None) -> None:
        try:
            if created_model:
                if self.exists(name):
                    self.client.delete_registered_model(name)
                return
            for alias, current in self.aliases(name).items():
                if alias not in before:
                    self.client.delete_registered_model_alias(name, alias)
                elif before[alias] != current:
                    self.client.set_registered_model_alias(name, alias, before[alias])
            for event in self.history(name)[events_before:]:
                self.client.delete_registered_model_tag(name, f"{EVENT_PREFIX}{event.seq:06d}")
            if version is not None:
                self.client.delete_model_version(name, version.version)
        except Exception:  # noqa: BLE001 - report, but the original error is what matters
            log.exception("registry: could not fully undo a failed registration of %s", name)

    def rollback(self, name: str, alias: str = CHAMPION, reason: str = "rollback") -> AliasEvent:
        """Move ``alias`` back to the version it pointed at before its last move."""
        moves = [e for e in self.history(name) if e.alias == alias]
        if not moves or moves[-1].from_version is None:
            raise RegistryError(f"{name}@{alias} has no earlier version to roll back to")
        return self.move_alias(name, alias, moves[-1].from_version, reason)


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"
