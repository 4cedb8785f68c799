"""The model registry (MLflow) with champion/challenger aliases and a recorded alias history.

Every alias move is written to the registered model as a tag ``alias_event.<n>`` holding who,
when, which alias, from which version to which, why, and what kind of move it was (``move``:
registration or promotion, ``rollback``), so a person can read the history in the MLflow UI and a
rollback knows where to go. Rollback replays that history as a stack of the versions the alias
has held: a move pushes its version, a rollback pops one. So two rollbacks in a row go back two
champions (3 -> 2 -> 1 after 1 -> 2 -> 3), a promotion after rollbacks starts again from there,
and a rollback with nowhere to go raises ``RegistryError`` and changes nothing. A move made
outside this class (the MLflow UI) is not in the history; the next rollback undoes it first.
Tags written before rollbacks were marked have no kind and read as moves.

``register`` is all-or-nothing: if any step fails, the new version, its alias moves and their
events are undone. A single move is too: if its event cannot be written, the alias goes back.
"""

from __future__ import annotations

import getpass
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Final

from core.errors import FlywheelError
from core.lineage import Lineage

log = logging.getLogger(__name__)

CHAMPION: Final = "champion"
CHALLENGER: Final = "challenger"
EVENT_PREFIX = "alias_event."
MOVE = "move"
ROLLBACK = "rollback"


@dataclass(frozen=True)
class AliasEvent:
    """One recorded alias move; ``kind`` is ``move`` or ``rollback``."""

    seq: int
    alias: str
    from_version: str | None
    to_version: str | None
    actor: str
    at: str
    reason: str
    kind: str = MOVE

    @property
    def why(self) -> str:
        """The reason, after the kind where that says more (``rollback: p99 latency``)."""
        return self.reason if self.kind in (MOVE, self.reason) else f"{self.kind}: {self.reason}"

    @classmethod
    def from_tag(cls, text: str) -> AliasEvent:
        """Read a tag value; fields this version does not know are ignored."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in json.loads(text).items() if key in known})


class RegistryError(FlywheelError):
    """A registry operation could not be done (nothing was changed)."""


def alias_stack(history: Iterable[AliasEvent], alias: str) -> list[str]:
    """The versions ``alias`` has held that a rollback can go back to, oldest first; the last
    is the version the history says it holds now.

    A move pushes its target, a rollback pops the version it left. A version seen in an event
    but not on top of the stack (the alias was moved outside the registry) is pushed first, so
    the stack always follows what the events saw. A move from no version (the alias was created
    or recreated) starts a new stack.
    """
    stack: list[str] = []

    def seen(version: str | None) -> None:
        if version is None:
            stack.clear()
        elif not stack or stack[-1] != version:
            stack.append(version)

    for event in history:
        if event.alias != alias:
            continue
        if event.kind == ROLLBACK:
            if stack and stack[-1] == event.from_version:
                stack.pop()
        else:
            seen(event.from_version)
        seen(event.to_version)
    return stack


class Registry:
    """Thin layer over ``mlflow.MlflowClient`` for one tracking server."""

    def __init__(self, client: Any, actor: str | None = None):
        self.client = client
        self.actor = actor or _whoami()

    @classmethod
    def for_uri(cls, tracking_uri: str, actor: str | None = None) -> Registry:
        from mlflow import MlflowClient

        return cls(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), actor)

    @classmethod
    def reader_for_uri(cls, tracking_uri: str) -> Registry:
        """A registry for reading aliases and their history only, without importing MLflow
        (about 2 s) where the store allows: MLflow's REST API for a tracking server, its
        tables for a local SQLite store; any other store through ``MlflowClient``."""
        if tracking_uri.startswith(("http://", "https://", "sqlite:///")):
            return cls(ReadOnlyClient(tracking_uri))
        return cls.for_uri(tracking_uri)

    # ------------------------------------------------------------------ reading
    def exists(self, name: str) -> bool:
        if isinstance(self.client, ReadOnlyClient):
            return self.client.has_model(name)
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            return False
        return True

    def require(self, name: str) -> None:
        """Raise ``RegistryError`` naming the registered models when ``name`` is not one."""
        if not self.exists(name):
            known = sorted(model.name for model in self.client.search_registered_models())
            raise RegistryError(f"no registered model {name!r} at {self.client.tracking_uri}; "
                                f"registered: {', '.join(known) or 'none'}")

    def version_exists(self, name: str, version: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_model_version(name, str(version))
        except MlflowException:
            return False
        return True

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version (empty when the model does not exist)."""
        if not self.exists(name):
            return {}
        return {alias: str(version) for alias, version in self.client.get_registered_model(name).aliases.items()}

    def tags(self, name: str) -> dict[str, str]:
        """The registered model's tags (empty when it does not exist)."""
        return dict(self.client.get_registered_model(name).tags) if self.exists(name) else {}

    def set_allocation(self, name: str, allocation: Any) -> None:
        """Set the challenger's share every service worker routes by (``core.allocation``)."""
        from core.allocation import ALLOCATION_TAG

        self.require(name)
        self.client.set_registered_model_tag(name, ALLOCATION_TAG, allocation.to_tag())

    def clear_allocation(self, name: str) -> None:
        """Drop the challenger's share set by a rollout, the bandit or a person: the service
        routes by serving.challenger_share again (an alias move drops a stale one by itself)."""
        from core.allocation import ALLOCATION_TAG

        if ALLOCATION_TAG in self.tags(name):
            self.client.delete_registered_model_tag(name, ALLOCATION_TAG)

    def version_by_alias(self, name: str, alias: str) -> Any | None:
        version = self.aliases(name).get(alias)
        return self.client.get_model_version(name, version) if version else None

    def history(self, name: str) -> list[AliasEvent]:
        if not self.exists(name):
            return []
        tags = self.client.get_registered_model(name).tags
        events = [AliasEvent.from_tag(v) for k, v in tags.items() if k.startswith(EVENT_PREFIX)]
        return sorted(events, key=lambda e: e.seq)

    # ------------------------------------------------------------------ writing
    def move_alias(self, name: str, alias: str, version: str, reason: str) -> AliasEvent:
        """Point ``alias`` at ``version`` (which must exist) and record the move."""
        self.require(name)
        if not self.version_exists(name, version):
            versions = sorted(int(v.version) for v in self.client.search_model_versions(f"name='{name}'"))
            raise RegistryError(f"{name} has no version {version}; its versions: "
                                f"{', '.join(map(str, versions)) or 'none'}")
        return self._move(name, alias, str(version), reason, MOVE)

    def promote(self, name: str, version: str, alias: str = CHAMPION, reason: str = "promote") -> AliasEvent:
        """Move ``alias`` to an existing ``version``: a person's decision, so moving it to the
        version it already holds is refused rather than recorded."""
        self.require(name)
        if self.aliases(name).get(alias) == str(version):
            raise RegistryError(f"{name}@{alias} is already version {version}; nothing changed")
        return self.move_alias(name, alias, str(version), reason)

    def rollback(self, name: str, alias: str = CHAMPION, reason: str = "rollback") -> AliasEvent:
        """Move ``alias`` back to the version it held before its current one.

        Walks back through the history: each rollback goes one version further back, until
        there is nowhere to go (``RegistryError``, nothing changed).
        """
        self.require(name)
        current = self.aliases(name).get(alias)
        if current is None:
            raise RegistryError(f"{name} has no alias {alias!r} to roll back")
        target = self.rollback_target(name, alias)
        if target is None:
            raise RegistryError(f"{name}@{alias} is version {current} and has no earlier version "
                                "to roll back to")
        if not self.version_exists(name, target):
            raise RegistryError(f"{name}@{alias} would roll back to version {target}, which no longer "
                                "exists; promote a version instead")
        return self._move(name, alias, target, reason, ROLLBACK)

    def rollback_target(self, name: str, alias: str = CHAMPION) -> str | None:
        """The version a rollback of ``alias`` would move it to; None when there is none."""
        current = self.aliases(name).get(alias)
        if current is None:
            return None
        stack = alias_stack(self.history(name), alias)
        if not stack or stack[-1] != current:
            stack.append(current)  # moved outside the registry: that move is the one undone
        return stack[-2] if len(stack) > 1 else None

    def _move(self, name: str, alias: str, version: str, reason: str, kind: str) -> AliasEvent:
        previous = self.aliases(name).get(alias)
        self.client.set_registered_model_alias(name, alias, version)
        try:
            event = self._record(name, alias, previous, version, reason, kind)
        except BaseException:
            self._put_back(name, alias, previous)
            raise
        self._drop_stale_allocation(name)
        return event

    def _drop_stale_allocation(self, name: str) -> None:
        """After an alias move: a challenger's share (``core.allocation``) set for a version that
        is no longer the challenger under test goes, so a version that comes back as challenger
        later starts from the configured share, not from where an earlier rollout or bandit left
        it."""
        from core.allocation import ALLOCATION_TAG, Allocation

        try:
            model = self.client.get_registered_model(name)
            allocation = Allocation.from_tag(model.tags.get(ALLOCATION_TAG))
            aliases = {a: str(v) for a, v in model.aliases.items()}
            testing = aliases.get(CHALLENGER) if aliases.get(CHALLENGER) != aliases.get(CHAMPION) else None
            if ALLOCATION_TAG in model.tags and (allocation is None or allocation.challenger_version != testing):
                self.client.delete_registered_model_tag(name, ALLOCATION_TAG)
        except Exception:  # noqa: BLE001 - the move stands; the service ignores a share made for another version
            log.exception("registry: could not drop the stale allocation of %s", name)

    def _put_back(self, name: str, alias: str, previous: str | None) -> None:
        try:
            if previous is None:
                self.client.delete_registered_model_alias(name, alias)
            else:
                self.client.set_registered_model_alias(name, alias, previous)
        except Exception:  # noqa: BLE001 - report, but the original error is what matters
            log.exception("registry: could not put %s@%s back to %s", name, alias, previous)

    def _record(self, name: str, alias: str, previous: str | None, version: str | None, reason: str,
                kind: str = MOVE) -> AliasEvent:
        seq = max((e.seq for e in self.history(name)), default=0) + 1
        event = AliasEvent(seq, alias, previous, version, self.actor,
                           datetime.now(UTC).isoformat(timespec="seconds"), reason, kind)
        self.client.set_registered_model_tag(name, f"{EVENT_PREFIX}{seq:06d}", json.dumps(asdict(event)))
        log.info("registry: %s@%s %s -> %s (%s)", name, alias, previous, version, event.why)
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


def _whoami() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return "unknown"


@dataclass
class LoadedVersion:
    """A registered version rebuilt for scoring: the model (``core.families.Fitted``, of the
    family the version names), its feature statistics and tags."""

    name: str
    version: str
    model: Any
    stats: Any
    tags: dict[str, str]

    @cached_property
    def lineage(self) -> Lineage:
        return Lineage.from_tags(self.tags)

    @property
    def feature_version(self) -> int:
        """The feature table version it was trained on (its lineage)."""
        version = self.lineage.feature_version
        if version is None:
            raise RegistryError(f"{self.name} version {self.version} records no feature version")
        return version


def cannot_heal(exc: BaseException) -> bool:
    """Whether loading a model version failed for good: its weights do not match their
    checksum, or the version or its artifacts do not exist. Waiting does not fix these (a
    registry or artifact store that does not answer may come back)."""
    from core.families import ModelIntegrityError

    if isinstance(exc, ModelIntegrityError | FileNotFoundError):
        return True
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def load_version(registry: Registry, name: str, version: Any, require_hash: bool = True) -> LoadedVersion:
    """Download a version's artifacts, check the weights' sha256 against the version's
    ``flywheel.weights_sha256`` tag and rebuild the model with the family its spec names (each
    family's safe format: nothing is unpickled). With ``require_hash`` a version without the tag
    is refused."""
    from pathlib import Path

    import mlflow

    from core.families import STATS_FILE, ModelIntegrityError, load_fitted
    from core.features import FeatureStats

    expected = Lineage.from_tags(version.tags).weights_sha256
    if require_hash and not expected:
        raise ModelIntegrityError(f"{name} version {version.version} has no recorded weights sha256 "
                                  "(flywheel.weights_sha256): refusing to load it")
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                      tracking_uri=registry.client._tracking_client.tracking_uri))
    model = load_fitted(folder, expected)
    return LoadedVersion(name, str(version.version), model, FeatureStats.from_json((folder / STATS_FILE).read_text()),
                         dict(version.tags))


def load_alias(registry: Registry, name: str, alias: str) -> LoadedVersion:
    """The version ``alias`` points to, loaded (``load_version``); LookupError if none does."""
    version = registry.version_by_alias(name, alias)
    if version is None:
        raise LookupError(f"{name} has no {alias} to load")
    return load_version(registry, name, version)


def registered_metrics(registry: Registry, name: str, versions: Iterable[str]) -> dict[str, dict[str, float]]:
    """Each version's metrics as recorded at registration (``flywheel.metrics``): version -> metrics."""
    return {version: Lineage.from_tags(registry.client.get_model_version(name, version).tags).metrics
            for version in sorted(set(versions))}


@dataclass(frozen=True)
class ModelRecord:
    """What ``ReadOnlyClient`` reads of a registered model (the fields Registry's readers use)."""

    name: str
    tags: dict[str, str]
    aliases: dict[str, str]


class ReadOnlyClient:
    """The registry reads ``Registry.history``, ``aliases`` and ``require`` need, straight from
    a tracking server's REST API (``/api/2.0/mlflow/registered-models/...``, with the
    MLFLOW_TRACKING_TOKEN or USERNAME/PASSWORD of the environment) or a local SQLite store's
    tables (read-only): no MLflow import. Writing goes through ``Registry.for_uri``."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri

    def has_model(self, name: str) -> bool:
        return self._model(name) is not None

    def get_registered_model(self, name: str) -> ModelRecord:
        model = self._model(name)
        if model is None:
            raise RegistryError(f"no registered model {name!r} at {self.tracking_uri}")
        return model

    def search_registered_models(self) -> list[ModelRecord]:
        if self.tracking_uri.startswith("sqlite:///"):
            rows = self._sql("SELECT name FROM registered_models ORDER BY name", ())
            return [ModelRecord(row[0], {}, {}) for row in rows]
        answer = self._rest("registered-models/search", {"max_results": "1000"}) or {}
        return [ModelRecord(m["name"], {}, {}) for m in answer.get("registered_models", [])]

    def _model(self, name: str) -> ModelRecord | None:
        if self.tracking_uri.startswith("sqlite:///"):
            if not self._sql("SELECT 1 FROM registered_models WHERE name = ?", (name,)):
                return None
            tags = dict(self._sql("SELECT key, value FROM registered_model_tags WHERE name = ?", (name,)))
            aliases = {alias: str(version) for alias, version in
                       self._sql("SELECT alias, version FROM registered_model_aliases WHERE name = ?", (name,))}
            return ModelRecord(name, tags, aliases)
        answer = self._rest("registered-models/get", {"name": name})
        if answer is None:
            return None
        model = answer["registered_model"]
        return ModelRecord(model["name"], {t["key"]: t["value"] for t in model.get("tags", [])},
                           {a["alias"]: str(a["version"]) for a in model.get("aliases", [])})

    def _sql(self, query: str, args: tuple[Any, ...]) -> list[Any]:
        import sqlite3
        from pathlib import Path

        path = Path(self.tracking_uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.exists():
            return []
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            try:
                return connection.execute(query, args).fetchall()
            except sqlite3.OperationalError:  # a store MLflow never initialised: no models
                return []

    def _rest(self, path: str, params: dict[str, str]) -> Any:
        """GET one MLflow REST endpoint; None for a resource that does not exist."""
        import base64
        import os
        import urllib.error
        import urllib.parse
        import urllib.request

        url = f"{self.tracking_uri.rstrip('/')}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
            request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            if exc.code == 404 and "RESOURCE_DOES_NOT_EXIST" in body:
                return None
            raise RegistryError(f"the tracking server at {self.tracking_uri} answered {exc.code} to {path}: "
                                f"{body[:200]}") from None
        except urllib.error.URLError as exc:
            raise RegistryError(f"cannot reach the tracking server at {self.tracking_uri}: {exc.reason}") from None
