"""Deploy: serve a dataset's registered models locally, and move them under live traffic.

    python -m flows.deploy serve [--port 3000] [--challenger-share 0.1] [--shadow]
    python -m flows.deploy status
    python -m flows.deploy promote      # the challenger becomes champion; the service reloads
    python -m flows.deploy rollback     # the previous champion comes back; the service reloads
    python -m flows.deploy stop

``serve`` starts ``bentoml serve serving.service:Flywheel`` on 127.0.0.1 (by default) as a
supervised background process, waits until it is ready and returns; run again, it reloads the
running service (or restarts it when its address or traffic settings changed). A promotion or
rollback moves the registry alias first (recorded in the alias history, with the Prefect
event ``flywheel.model.promoted`` / ``flywheel.model.rolled_back``), then asks the service to
reload: in-flight requests finish on the old model, the next ones get the new one.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.events import emit_event
from pydantic import BaseModel, Field, model_validator

from core.contract import load_contract
from core.registry import CHALLENGER, CHAMPION, Registry
from core.settings import get_settings
from flows._runtime import lake_for, main, model_name_for, run_started
from flows.registry import _resource, cli_args, promote_version, roll_back

Action = Literal["serve", "stop", "status", "promote", "rollback"]


class DeployParams(BaseModel):
    """Serve a dataset's champion (and challenger) with BentoML, or promote / roll back under
    traffic (the action may come first: `python -m flows.deploy serve`)."""

    action: Action = Field("status", description="serve: start or refresh the local service; stop: end it; "
                           "status: what is serving; promote: challenger -> champion, then reload; "
                           "rollback: the previous champion, then reload.")
    dataset: str = Field("flights", description="Dataset whose registered model is served.")
    smoke_test: bool = Field(False, description="The smoke-test model and lake of `flows.train --smoke-test`.")
    host: str | None = Field(None, description="Bind address (default: settings serving.host, 127.0.0.1).")
    port: int | None = Field(None, ge=1, le=65535, description="Port (default: settings serving.port, 3000).")
    challenger_share: float | None = Field(None, ge=0, le=1, description="Share of routing keys sent to the "
                                           "challenger (default: settings serving.challenger_share).")
    shadow: bool | None = Field(None, description="The challenger also scores champion traffic (logged only).")
    routing_field: str | None = Field(None, description="Record field that keys sticky routing (e.g. tailnum).")
    reason: str | None = Field(None, description="promote/rollback: why, recorded in the alias history.")
    wait_s: float = Field(300.0, gt=0, description="serve: how long to wait for the service to be ready.")

    @model_validator(mode="after")
    def _serve_options(self) -> DeployParams:
        given = [f for f in ("host", "port", "challenger_share", "shadow", "routing_field") if getattr(self, f) is not None]
        if given and self.action != "serve":
            raise ValueError(f"{', '.join('--' + g.replace('_', '-') for g in given)} apply to serve, not {self.action}")
        return self


class DeployResult(BaseModel):
    action: Action
    model_name: str
    url: str | None
    running: bool
    serving: dict[str, Any] | None = Field(description="What the service reports it serves (GET /admin/models).")
    moved: dict[str, Any] | None = None


@flow(name="deploy", log_prints=True)
def deploy(params: DeployParams = DeployParams()) -> DeployResult:
    """Start, inspect, stop the local service, or promote / roll back with a reload."""
    from tasks.deploy import (
        DeployError,
        admin,
        is_ours,
        port_for,
        read_state,
        reload_task,
        start_task,
        state_file,
        stop_task,
    )

    run_started()
    logger = get_run_logger()
    settings = get_settings()
    model_name = model_name_for(params.dataset, params.smoke_test)
    served = read_state(settings, model_name)
    if served is not None and not is_ours(served):
        logger.warning("the service recorded for %s (process %d) is gone; forgetting it", model_name, served.pid)
        state_file(settings, model_name).unlink(missing_ok=True)
        served = None
    moved = None

    if params.action == "serve":
        config = settings.serving
        host, port = params.host or config.host, params.port or config.port
        share = config.challenger_share if params.challenger_share is None else params.challenger_share
        shadow = config.shadow if params.shadow is None else params.shadow
        routing_field = params.routing_field or config.routing_field
        # A running service keeps its options unless this call names others (the deploy run a
        # registration triggers reloads the models and leaves the traffic split alone).
        wanted = {k: getattr(params, k) for k in ("host", "port", "challenger_share", "shadow", "routing_field")
                  if getattr(params, k) is not None}
        Registry.for_uri(settings.tracking_uri).require(model_name)
        load_contract(params.dataset)  # a bad contract stops here, with its message, not in the service
        if served is not None and all(getattr(served, k) == v for k, v in wanted.items()):
            logger.info("already serving %s at %s: reloading its models", model_name, served.url)
            reload_task(served)
        else:
            if served is not None:
                logger.info("restarting %s with new settings %s", model_name, wanted)
                stop_task(served, state_file(settings, model_name), settings.serving.drain_s)
                host, port = wanted.get("host", served.host), wanted.get("port", served.port)
                share = wanted.get("challenger_share", served.challenger_share)
                shadow = wanted.get("shadow", served.shadow)
                routing_field = wanted.get("routing_field", served.routing_field)
            if served is None and params.port is None:
                chosen = port_for(settings, model_name, port)
                if chosen != port:
                    logger.info("port %d serves another model: %s gets %d", port, model_name, chosen)
                port = chosen
            lake = lake_for(settings, params.smoke_test).root
            served = start_task(settings, params.dataset, model_name, lake, host, port, share, shadow,
                                routing_field, params.wait_s)
            logger.info("serving %s at %s (log: %s)", model_name, served.url, served.log_file)
    elif params.action == "stop":
        if served is None:
            logger.info("%s is not being served", model_name)
        else:
            stop_task(served, state_file(settings, model_name), settings.serving.drain_s)
            logger.info("stopped the service of %s (process %d)", model_name, served.pid)
            served = None
    elif params.action in ("promote", "rollback"):
        registry = Registry.for_uri(settings.tracking_uri)
        registry.require(model_name)
        reason = params.reason or params.action
        if params.action == "promote":
            challenger = registry.aliases(model_name).get(CHALLENGER)
            if challenger is None:
                raise DeployError(f"{model_name} has no challenger to promote")
            if challenger == registry.aliases(model_name).get(CHAMPION):
                raise DeployError(f"{model_name} version {challenger} is already the champion")
            event = promote_version(registry, model_name, int(challenger), CHAMPION, reason)
            emit_event("flywheel.model.promoted", resource=_resource(model_name), payload=asdict(event))
        else:
            event = roll_back(registry, model_name, CHAMPION, reason)
            emit_event("flywheel.model.rolled_back", resource=_resource(model_name), payload=asdict(event))
        moved = asdict(event)
        logger.info("%s@champion: version %s -> %s", model_name, event.from_version, event.to_version)
        if served is not None:
            reload_task(served)
        else:
            logger.info("no local service for %s: the next `serve` loads the new champion", model_name)

    serving = None
    if served is not None:
        try:
            serving = admin(served, "GET", "/models", timeout=10)
        except Exception as exc:  # noqa: BLE001 - status is best effort
            logger.warning("could not read the service's status: %s", exc)
    return DeployResult(action=params.action, model_name=model_name, url=served.url if served else None,
                        running=served is not None, serving=serving, moved=moved)


def report(result: DeployResult) -> None:
    from rich.console import Console

    console = Console()
    if result.moved:
        console.print(f"{result.model_name}@champion: version {result.moved['from_version']} -> "
                      f"{result.moved['to_version']}")
    if not result.running:
        console.print(f"{result.model_name}: not serving")
        return
    serving = result.serving or {}
    champion, challenger = serving.get("champion") or {}, serving.get("challenger") or {}
    console.print(f"serving [bold]{result.model_name}[/bold] at {result.url}  "
                  f"(champion v{champion.get('version', '?')}"
                  + (f", challenger v{challenger['version']} on {serving.get('challenger_share', 0):.0%} of keys"
                     f"{' + shadow' if serving.get('shadow') else ''}" if challenger else "") + ")")
    console.print(f"  try: curl -s {result.url}/readyz ; API docs: {result.url}/docs")


if __name__ == "__main__":
    sys.exit(main(deploy, DeployParams, cli_args(sys.argv[1:]), "python -m flows.deploy", report))
