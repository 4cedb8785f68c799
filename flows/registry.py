"""Registry: read a model's alias history, promote a version, roll an alias back.

``python -m flows.registry ACTION`` acts on the dataset's registered model (name from settings
``train.model_name``, tracking URI from settings) so a person can put a challenger in front of
traffic, or take it back, without the MLflow UI:

    python -m flows.registry history
    python -m flows.registry promote --version 3 --reason "won the A/B test"
    python -m flows.registry rollback --reason "p99 latency"

Each move is recorded in the model's alias history (``core.registry``); a promotion emits the
Prefect event ``flywheel.model.promoted`` and a rollback ``flywheel.model.rolled_back``, with the
resource ``flywheel.model.<model name>``, so automations can follow them. A move that cannot be
done (no such version, nowhere to roll back to) fails with one line and changes nothing.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from core.registry import CHAMPION, AliasEvent, Registry
from core.settings import get_settings
from flows._runtime import answer, artifact_key, cli_args, main, model_name_for, read_only

Action = Literal["history", "promote", "rollback"]


class RegistryParams(BaseModel):
    """Show a model's alias history, promote a version or roll an alias back (the action may
    come first: `python -m flows.registry rollback`)."""

    action: Action = Field("history", description="history: the alias history and current aliases; "
                           "promote: move the alias to --version; rollback: move the alias back to "
                           "the version it held before (again: one further back).")
    version: int | None = Field(None, ge=1, description="promote only: the model version the alias moves to.")
    alias: Literal["champion", "challenger"] = Field(CHAMPION, description="The alias to move.")
    reason: str | None = Field(None, description="Why, recorded with the move (default: the action's name).")
    dataset: str = Field("flights", description="Dataset whose model this is (name from settings train.model_name).")
    smoke_test: bool = Field(False, description="Act on the smoke-test model that `flows.train --smoke-test` registers.")

    @model_validator(mode="after")
    def _version_goes_with_promote(self) -> RegistryParams:
        if self.action == "promote" and self.version is None:
            raise ValueError("promote needs --version N")
        if self.action != "promote" and self.version is not None:
            raise ValueError(f"--version applies to promote, not {self.action}")
        return self


class RegistryResult(BaseModel):
    model_name: str
    tracking_uri: str
    action: Action
    moved: AliasEvent | None
    aliases: dict[str, str]
    rollback_targets: dict[str, str | None] = Field(
        description="alias -> the version a rollback would move it to (None: nowhere).")
    history: list[AliasEvent]


def described(model_registry: Registry, model_name: str, params: RegistryParams,
              moved: AliasEvent | None = None) -> RegistryResult:
    history = model_registry.history(model_name)
    aliases = model_registry.aliases(model_name)
    rollback_targets = {alias: model_registry.rollback_target(model_name, alias) for alias in aliases}
    return RegistryResult(model_name=model_name, tracking_uri=get_settings().tracking_uri, action=params.action,
                          moved=moved, aliases=aliases, rollback_targets=rollback_targets, history=history)


def history(params: RegistryParams) -> RegistryResult:
    """The alias history without a flow run (``python -m flows.registry history``): read-only,
    so it starts no Prefect server and imports neither Prefect nor MLflow where the store
    allows (``Registry.reader_for_uri``)."""
    model_name = model_name_for(params.dataset, params.smoke_test)
    model_registry = Registry.reader_for_uri(get_settings().tracking_uri)
    model_registry.require(model_name)
    return described(model_registry, model_name, params)


def report(result: RegistryResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result.action == "history":
        table = Table(title=f"alias history of {result.model_name} ({result.tracking_uri})")
        for column in ("seq", "when (UTC)", "who", "alias", "from -> to", "kind", "reason"):
            table.add_column(column, no_wrap=column != "reason")
        for event in result.history:
            table.add_row(str(event.seq), _utc(event.at), event.actor, event.alias,
                          f"{event.from_version or '-'} -> {event.to_version or '-'}", event.kind, event.reason)
        console.print(table)
    elif result.moved is not None:
        moved = result.moved
        console.print(f"{result.model_name}@{moved.alias}: version {moved.from_version} -> "
                      f"{moved.to_version} ({moved.why})")
    console.print("aliases now: " + (", ".join(f"{alias} = version {version}"
                                                for alias, version in sorted(result.aliases.items())) or "none"))
    for alias, target in sorted(result.rollback_targets.items()):
        console.print(f"a rollback of {alias} would go to "
                      + (f"version {target}" if target else "nowhere (no earlier version)"))


def _utc(at: str) -> str:
    try:
        return datetime.fromisoformat(at).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return at


if __name__ == "__main__" and read_only(sys.argv[1:], ("history",), "history"):
    sys.exit(answer(history, RegistryParams, cli_args(sys.argv[1:]), "python -m flows.registry", report))

# The flow (the UI, deployments, promote and rollback) from here on: Prefect is imported only now.
from prefect import flow  # noqa: E402
from prefect.artifacts import create_table_artifact  # noqa: E402

from flows._runtime import run_started  # noqa: E402
from tasks.registry import promote_task, rollback_task  # noqa: E402


@flow(name="registry", log_prints=True)
def registry(params: RegistryParams = RegistryParams()) -> RegistryResult:
    """Show a registered model's alias history, promote a version, or roll an alias back."""
    run_started()
    model_name = model_name_for(params.dataset, params.smoke_test)
    model_registry = Registry.for_uri(get_settings().tracking_uri)
    model_registry.require(model_name)
    reason = params.reason or params.action
    moved = None
    if params.action == "promote":
        assert params.version is not None  # the parameter model checks it
        moved = promote_task(model_registry, model_name, params.version, params.alias, reason)
    elif params.action == "rollback":
        moved = rollback_task(model_registry, model_name, params.alias, reason)
    result = described(model_registry, model_name, params, moved)
    create_table_artifact([asdict(e) for e in result.history], key=artifact_key("registry", model_name),
                          description=f"Alias history of **{model_name}**; now "
                                      + ", ".join(f"{a} = v{v}" for a, v in sorted(result.aliases.items())))
    return result


if __name__ == "__main__":
    sys.exit(main(registry, RegistryParams, cli_args(sys.argv[1:]), "python -m flows.registry", report))
