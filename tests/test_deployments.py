"""deployments/prefect.yaml against a real Prefect server: every deployment registers, and the
retraining guardrail holds: five drift events in a few seconds start one train run."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port, register_deployments

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_the_deployments_register_and_five_drift_events_start_one_retrain(prefect_server, monkeypatch):
    env = {**prefect_server, "FLYWHEEL_REPO": str(REPO)}
    register_deployments(env, monkeypatch)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def state() -> tuple[dict, dict[str, str], int]:
        async with get_client() as client:
            deployments = {d.name: d for d in await client.read_deployments()}
            automations = {a.name: a.description for a in await client.read_automations()}
            train = deployments["train"]
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[train.id])))
            by_automation = [r for r in runs if not r.auto_scheduled]  # not the weekly schedule's
            return deployments, automations, len(by_automation)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        deployments, automations, before = asyncio.run(state())
        assert set(deployments) == {"ingest-daily", "etl", "train", "monitor", "evaluate-hourly", "serve-registered",
                                    "rollout", "stream", "maintain-daily"}
        assert deployments["train"].global_concurrency_limit is not None
        assert deployments["train"].global_concurrency_limit.limit == 1
        # Each trigger's automation carries the trigger's name and description (not
        # `train__automation_1`).
        document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
        named = {t["name"]: t["description"] for d in document["deployments"] for t in d.get("triggers") or []}
        assert {"retrain on drift", "retrain on degraded performance", "serve on registration",
                "roll out on registration"} <= set(named)
        assert {name: automations.get(name) for name in named} == named
        assert before == 0
        # Events go through a process-wide worker bound to the API it was created for: an
        # earlier in-process flow (another test's) made one for another server. Start afresh.
        EventsWorker.drain_all()
        for i in range(5):
            emit_event("flywheel.drift.detected", resource={"prefect.resource.id": "flywheel.model.flywheel-flights",
                                                            "prefect.resource.name": "flywheel-flights"},
                       payload={"dataset": "flights", "burst": i})  # as flows.monitor sends it
        EventsWorker.drain_all()
        deadline = time.time() + 60
        started = 0
        while time.time() < deadline and started == 0:
            time.sleep(1)
            started = asyncio.run(state())[2]
        time.sleep(5)  # any further run the burst might start would be there by now
        assert asyncio.run(state())[2] == 1


def test_a_drift_event_starts_a_train_run_that_a_worker_completes(prefect_server, interaction_dataset, tmp_path,
                                                                   monkeypatch):
    """The loop's automation end to end: server, process worker, the deployments; a drift event
    for the interaction dataset's model starts the train deployment on that dataset (from the
    event's payload) and the run registers a model, and the registration event starts the
    serve-registered deployment for the same dataset."""
    from core.registry import Registry

    prefect = str(Path(sys.executable).parent / "prefect")
    home = tmp_path / "home"
    env = {**prefect_server, "FLYWHEEL_REPO": str(REPO), "FLYWHEEL_HOME": str(home),
           "FLYWHEEL_DATASETS_DIR": str(interaction_dataset), "INTERACTION_CSV": os.environ["INTERACTION_CSV"],
           "FLYWHEEL_TRAIN": '{"trials": 1, "max_epochs": 2, "grace_period": 1, "num_workers": 1}',
           "FLYWHEEL_SERVING__PORT": str(free_port())}
    register_deployments(env, monkeypatch)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def train_deployment() -> Any:
        async with get_client() as client:
            return next(d for d in await client.read_deployments() if d.name == "train")

    async def triggered_runs(deployment_id: Any) -> list:
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
            return [r for r in runs if not r.auto_scheduled]

    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "flywheel-local"], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            train = asyncio.run(train_deployment())
            EventsWorker.drain_all()  # a fresh events worker, bound to this server (see above)
            # The trigger takes the dataset from the event: the deployment's default is flights.
            emit_event("flywheel.drift.detected", resource={"prefect.resource.id": "flywheel.model.flywheel-interaction",
                                                            "prefect.resource.name": "flywheel-interaction"},
                       payload={"dataset": "interaction"})
            EventsWorker.drain_all()
            deadline = time.time() + 480
            runs: list = []
            while time.time() < deadline:
                runs = asyncio.run(triggered_runs(train.id))
                if runs and runs[0].state and runs[0].state.is_final():
                    break
                time.sleep(2)
        assert runs, "the drift event started no train run"
        assert runs[0].state is not None and runs[0].state.is_completed(), (
            runs[0].state, (tmp_path / "worker.log").read_text()[-4000:])
        registry = Registry.for_uri(f"sqlite:///{home / 'mlflow.db'}")
        assert registry.aliases("flywheel-interaction").get("champion") == "1"
        assert runs[0].parameters["params"]["dataset"] == "interaction"

        async def serve_runs() -> list:
            async with get_client() as client:
                serve = next(d for d in await client.read_deployments() if d.name == "serve-registered")
                return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[serve.id])))

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            deadline = time.time() + 240
            served: list = []
            while time.time() < deadline:
                served = asyncio.run(serve_runs())
                if served and served[0].state and served[0].state.is_final():
                    break
                time.sleep(2)
        assert served, "the registration started no serve-registered run"
        assert served[0].parameters["params"] == {"action": "serve", "dataset": "interaction"}
        assert served[0].state.is_completed(), (tmp_path / "worker.log").read_text()[-4000:]
    finally:
        from core.settings import configure
        from serving.control import read_state, state_file
        from serving.control import stop as stop_service

        settings = configure(home=str(home))
        service = read_state(settings, "flywheel-interaction")
        if service is not None:
            stop_service(service, state_file(settings, "flywheel-interaction"))
        configure()
        os.killpg(worker.pid, 2)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
