"""Deploy: serve a dataset's registered models locally, and move them under live traffic.

    python -m flows.deploy serve [--port 3000] [--challenger-share 0.1] [--shadow]
    python -m flows.deploy status
    python -m flows.deploy promote      # the challenger becomes champion; the service reloads
    python -m flows.deploy rollback     # the previous champion comes back; the service reloads
    python -m flows.deploy rollout      # the challenger's share 5% -> 25% -> 50% -> 100%, analysed at each step
    python -m flows.deploy stop

``serve`` starts ``bentoml serve serving.service:Flywheel`` on 127.0.0.1 (by default) as a
supervised background process, waits until it is ready and returns; run again, it reloads the
running service (or restarts it when its address or traffic settings changed). A promotion or
rollback moves the registry alias first (recorded in the alias history, with the Prefect
event ``flywheel.model.promoted`` / ``flywheel.model.rolled_back``), then asks the service to
reload: in-flight requests finish on the old model, the next ones get the new one.

``rollout`` moves the challenger's share through steps (``--steps``, ``--hold-s``,
``--min-requests``); before each next step it compares the challenger with the champion on the
step's window (error rate, p99 latency, score PSI, the online metric once there is ground
truth: ``core.rollout``). A breach rolls back (recorded alias move, event
``flywheel.rollout.rolled_back``, reload); the last step's pass promotes. Each step is a task
run and an event ``flywheel.rollout.step``; the steps are a row each in the artifact
``rollout-<model>``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from core.registry import AliasEvent
from core.settings import get_settings
from flows._runtime import answer, cli_args, main, model_name_for, read_only

Action = Literal["serve", "stop", "status", "promote", "rollback", "rollout"]


class DeployParams(BaseModel):
    """Serve a dataset's champion (and challenger) with BentoML, or promote / roll back under
    traffic (the action may come first: `python -m flows.deploy serve`)."""

    action: Action = Field("status", description="serve: start or refresh the local service; stop: end it; "
                           "status: what is serving; promote: challenger -> champion, then reload; "
                           "rollback: the previous champion, then reload; rollout: the challenger's share in "
                           "steps, analysed at each, rolled back on a breach, promoted at the end.")
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
    steps: list[float] = Field([0.05, 0.25, 0.5, 1.0], description="rollout: the challenger's shares in turn, "
                               "rising to 1 (100%).")
    hold_s: float = Field(300.0, ge=0, description="rollout: the least time a step holds before its analysis.")
    min_requests: int = Field(100, ge=1, description="rollout: challenger requests a step needs before its analysis.")
    max_wait_s: float = Field(1800.0, gt=0, description="rollout: a step with too little traffic by then rolls back.")
    max_latency_increase_s: float = Field(0.025, ge=0, description="rollout: how much higher the challenger's p99 "
                                          "latency may be than the champion's.")
    max_error_rate_increase: float = Field(0.01, ge=0, le=1, description="rollout: how much higher the challenger's "
                                           "error rate may be than the champion's.")

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
    rollout: dict[str, Any] | None = Field(None, description="rollout: the outcome and each step's analysis.")


def _result(params: DeployParams, model_name: str, served: Any, moved: AliasEvent | None = None,
            status: Any = None) -> DeployResult:
    from serving.control import service_status

    return DeployResult(action=params.action, model_name=model_name, url=served.url if served else None,
                        running=served is not None, serving=(status or service_status)(served),
                        moved=asdict(moved) if moved else None)


def service(params: DeployParams) -> DeployResult:
    """What is serving, without a flow run (``python -m flows.deploy status``): read-only."""
    from serving.control import running

    model_name = model_name_for(params.dataset, params.smoke_test)
    return _result(params, model_name, running(get_settings(), model_name))


def report(result: DeployResult) -> None:
    from rich.console import Console

    console = Console()
    if result.rollout:
        for step in result.rollout["steps"]:
            console.print(f"  step {step['step'] + 1} ({step['share']:.0%}): {step['verdict']}: {step['reason']}")
        console.print(f"rollout: [bold]{result.rollout['outcome']}[/bold] ({result.rollout['reason']})")
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


if __name__ == "__main__" and read_only(sys.argv[1:], ("status",), "status"):
    sys.exit(answer(service, DeployParams, cli_args(sys.argv[1:]), "python -m flows.deploy", report))

# The flows (the UI, deployments, serve, stop, promote, rollback) from here on: Prefect is
# imported only now.
from prefect import flow, get_run_logger  # noqa: E402

from core.contract import load_contract  # noqa: E402
from core.registry import CHAMPION, Registry  # noqa: E402
from flows._runtime import lake_for, run_started  # noqa: E402
from tasks.deploy import status_task  # noqa: E402


@flow(name="serve", log_prints=True)
def serve(params: DeployParams) -> DeployResult:
    """Wires: the running service (if any) -> the plan (``tasks.deploy.serve_plan``: reload,
    restart with other options, or start) -> a reload, or a stop and a start."""
    from tasks.deploy import (
        port_for,
        reload_task,
        running_task,
        serve_plan,
        start_task,
        state_file,
        stop_task,
    )

    run_started()
    logger, settings = get_run_logger(), get_settings()
    model_name = model_name_for(params.dataset, params.smoke_test)
    Registry.for_uri(settings.tracking_uri).require(model_name)
    load_contract(params.dataset)  # a bad contract stops here, with its message, not in the service
    served = running_task(settings, model_name)
    what, options = serve_plan(settings.serving, params.model_dump(), served)
    if served is not None and what == "reload":
        logger.info("already serving %s at %s: reloading its models", model_name, served.url)
        reload_task(served)
        return _result(params, model_name, served, status=status_task)
    if served is not None:  # "restart"
        logger.info("restarting %s with %s", model_name, options)
        stop_task(served, state_file(settings, model_name), settings.serving.drain_s)
    elif params.port is None and (port := port_for(settings, model_name, options.port)) != options.port:
        logger.info("port %d serves another model: %s gets %d", options.port, model_name, port)
        options = replace(options, port=port)
    served = start_task(settings, params.dataset, model_name, lake_for(settings, params.smoke_test).root,
                        options.host, options.port, options.challenger_share, options.shadow,
                        options.routing_field, params.wait_s)
    logger.info("serving %s at %s (log: %s)", model_name, served.url, served.log_file)
    return _result(params, model_name, served, status=status_task)


@flow(name="stop service", log_prints=True)
def stop(params: DeployParams) -> DeployResult:
    """Wires: the running service -> its drain and stop (``tasks.deploy.stop``)."""
    from tasks.deploy import running_task, state_file, stop_task

    run_started()
    settings = get_settings()
    model_name = model_name_for(params.dataset, params.smoke_test)
    served = running_task(settings, model_name)
    if served is None:
        get_run_logger().info("%s is not being served", model_name)
    else:
        stop_task(served, state_file(settings, model_name), settings.serving.drain_s)
        get_run_logger().info("stopped the service of %s (process %d)", model_name, served.pid)
    return _result(params, model_name, None, status=status_task)


@flow(name="service status", log_prints=True)
def status(params: DeployParams) -> DeployResult:
    """Wires: the running service -> what it reports it serves."""
    from tasks.deploy import running_task

    run_started()
    model_name = model_name_for(params.dataset, params.smoke_test)
    return _result(params, model_name, running_task(get_settings(), model_name), status=status_task)


@flow(name="promote served", log_prints=True)
def promote(params: DeployParams) -> DeployResult:
    """Wires: the challenger -> champion (``tasks.registry.promote``: recorded, evented) -> the
    service's reload."""
    return _move(params)


@flow(name="roll back served", log_prints=True)
def rollback(params: DeployParams) -> DeployResult:
    """Wires: the previous champion back (``tasks.registry.rollback``: recorded, evented) -> the
    service's reload."""
    return _move(params)


def _move(params: DeployParams) -> DeployResult:
    from tasks.deploy import reload_task, running_task
    from tasks.registry import promote_task, rollback_task

    run_started()
    logger, settings = get_run_logger(), get_settings()
    model_name = model_name_for(params.dataset, params.smoke_test)
    registry = Registry.for_uri(settings.tracking_uri)
    registry.require(model_name)
    reason = params.reason or params.action
    event = (promote_task(registry, model_name, None, CHAMPION, reason) if params.action == "promote"
             else rollback_task(registry, model_name, CHAMPION, reason))
    logger.info("%s@champion: version %s -> %s", model_name, event.from_version, event.to_version)
    served = running_task(settings, model_name)
    if served is not None:
        answer = reload_task(served)
        logger.info("the service switched at %s; every worker serves it within %.0f s", answer.get("switched_at"),
                    answer.get("all_workers_within_s", 0.0))
    else:
        logger.info("no local service for %s: the next `serve` loads the new champion", model_name)
    return _result(params, model_name, served, event, status=status_task)


@flow(name="rollout", log_prints=True)
def rollout(params: DeployParams) -> DeployResult:
    """Wires: the running service and its challenger (``tasks.rollout.ServiceTarget``) -> each
    step as a task run (``core.rollout.run_rollout`` with ``step_task``: share, hold, analysis,
    event) -> rollback on a breach or promotion after the last -> the artifact."""
    from core.rollout import RolloutPlan, run_rollout
    from tasks.deploy import running_task
    from tasks.rollout import ServiceTarget, publish_task, step_task

    run_started()
    settings = get_settings()
    model_name = model_name_for(params.dataset, params.smoke_test)
    served = running_task(settings, model_name)
    if served is None:
        raise RuntimeError(f"{model_name} is not being served: `python -m flows.deploy serve` first")
    plan = RolloutPlan(steps=tuple(params.steps), hold_s=params.hold_s, min_requests=params.min_requests,
                       max_wait_s=max(params.max_wait_s, params.hold_s), max_latency_increase_s=params.max_latency_increase_s,
                       max_error_rate_increase=params.max_error_rate_increase)
    target = ServiceTarget(Registry.for_uri(settings.tracking_uri), model_name, served,
                           lake_for(settings, params.smoke_test), load_contract(params.dataset), plan,
                           settings.monitor.prometheus_url)
    outcome = run_rollout(plan, target, poll_s=min(2.0, max(plan.hold_s / 4, 0.5)), step_runner=step_task)
    publish_task(target, outcome)
    get_run_logger().info("rollout of %s v%s: %s (%s)", model_name, target.challenger, outcome.outcome, outcome.reason)
    return DeployResult(action=params.action, model_name=model_name, url=served.url, running=True,
                        serving=status_task(served), rollout={"outcome": outcome.outcome, "reason": outcome.reason,
                                                              "steps": [s.as_dict() for s in outcome.steps]})


ACTIONS = {"serve": serve, "stop": stop, "status": status, "promote": promote, "rollback": rollback,
           "rollout": rollout}


@flow(name="deploy", log_prints=True)
def deploy(params: DeployParams = DeployParams()) -> DeployResult:
    """Wires: the action's own flow (serve, stop, status, promote, rollback, rollout), run as its subflow.
    The Prefect deployment ``serve-registered`` and the CLI start here."""
    return ACTIONS[params.action](params)


if __name__ == "__main__":
    sys.exit(main(deploy, DeployParams, cli_args(sys.argv[1:]), "python -m flows.deploy", report))
