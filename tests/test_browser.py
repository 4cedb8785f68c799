"""The Prefect UI in a real browser: headless Chromium from Debian driven by Playwright finds
the Flywheel deployments, starts the monitor deployment with a click, and the run completes on
a process worker; the Automations page lists the automations of prefect.yaml's triggers by
their names. The screenshots are kept under test-artifacts/."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import PrefectServer, need_service, register_deployments

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
pytestmark = pytest.mark.slow


def chromium() -> str:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium") or ""):
        if candidate and Path(candidate).exists():
            return candidate
    need_service("Debian's chromium is not installed (apt-get install chromium)")
    raise AssertionError("unreachable")


def named_triggers() -> dict[str, str]:
    """The name and description of each trigger of deployments/prefect.yaml (each becomes an
    automation of that name)."""
    document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    named = {t["name"]: t["description"] for d in document["deployments"] for t in d.get("triggers") or []}
    assert named, "prefect.yaml has no named triggers"
    return named


def test_the_monitor_deployment_started_from_the_prefect_ui_completes(tmp_path, prefect_harness, fast_training,
                                                                     monkeypatch):
    executable = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need_service("playwright is not installed (pip install playwright)")
    # A champion to monitor: the interaction dataset trained in this process (no live traffic
    # yet, so the monitor's window is too small to judge, and the run says so and completes).
    from flows.train import TrainParams, train

    assert train(TrainParams(dataset="interaction")).registered_version == "1"

    server = PrefectServer(tmp_path, ui=True)
    server.start()
    env = {**server.env, "FLYWHEEL_REPO": str(REPO), "FLYWHEEL_HOME": str(fast_training.home),
           "FLYWHEEL_DATASETS_DIR": str(fast_training.datasets_dir), "INTERACTION_CSV": os.environ["INTERACTION_CSV"],
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker = None
    try:
        register_deployments(env, monkeypatch)
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import DeploymentUpdate
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def monitor_on_interaction() -> str:
            async with get_client() as client:
                monitor = next(d for d in await client.read_deployments() if d.name == "monitor")
                await client.update_deployment(monitor.id, DeploymentUpdate(
                    parameters={"params": {"dataset": "interaction"}}))
                return str(monitor.id)

        with temporary_settings({PREFECT_API_URL: server.api}):
            monitor_id = asyncio.run(monitor_on_interaction())
        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                       "flywheel-local"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        ARTIFACTS.mkdir(exist_ok=True)
        base = f"http://127.0.0.1:{server.port}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{base}/deployments", wait_until="networkidle")
            for name in ("train", "monitor", "evaluate-hourly", "serve-registered", "rollout", "ingest-daily"):
                page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "prefect-ui-deployments.png"), full_page=True)
            page.get_by_role("link", name="monitor", exact=True).first.click()
            # The deployment's own page, loaded (a Run clicked while the single-page app still
            # fetched the deployment started nothing once, in a full run).
            page.wait_for_url(f"**/deployments/deployment/{monitor_id}**", timeout=30_000)
            page.wait_for_load_state("networkidle")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Quick run", exact=True).click()

            def clicked_run() -> dict:
                runs = requests.post(f"{server.api}/flow_runs/filter", timeout=10, json={
                    "flow_runs": {"deployment_id": {"any_": [monitor_id]}}, "limit": 5}).json()
                clicked = [r for r in runs if not r.get("auto_scheduled")]
                return clicked[0] if clicked else {}

            deadline = time.time() + 30
            while not (run := clicked_run()) and time.time() < deadline:
                time.sleep(1)
            if not run:
                page.screenshot(path=str(ARTIFACTS / "prefect-ui-quick-run-started-nothing.png"), full_page=True)
            assert run, "clicking Quick run in the UI started no monitor run within 30 s"
            deadline = time.time() + 300
            while run["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") \
                    and time.time() < deadline:
                time.sleep(2)
                run = clicked_run()
            assert run["state_type"] == "COMPLETED", (run["state_type"],
                                                      (tmp_path / "worker.log").read_text()[-4000:])
            page.goto(f"{base}/runs/flow-run/{run['id']}", wait_until="networkidle")
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "prefect-ui-monitor-run.png"), full_page=True)

            # The automations prefect.yaml's triggers made, listed on the Automations page under
            # their own names (not `train__automation_1`) with their descriptions.
            page.goto(f"{base}/automations", wait_until="networkidle")
            for name, description in named_triggers().items():
                page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=30_000)
                page.get_by_text(description, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "prefect-ui-automations.png"), full_page=True)
            browser.close()
        assert (ARTIFACTS / "prefect-ui-monitor-run.png").stat().st_size > 10_000
        assert (ARTIFACTS / "prefect-ui-automations.png").stat().st_size > 10_000
    finally:
        if worker is not None:
            os.killpg(worker.pid, 2)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
        server.stop()
