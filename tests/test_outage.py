"""The Prefect server goes away for 30 s in the middle of a flow run: the run carries on once
it is back and ends Completed (not stuck Running), and a rerun writes nothing twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from tests.conftest import PrefectServer

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _runs(api: str, path: str) -> list[dict]:
    return requests.post(f"{api}/{path}/filter", json={"limit": 200}, timeout=10).json()


def test_a_30_s_server_outage_mid_run_ends_completed_and_a_rerun_duplicates_nothing(tmp_path, interaction_dataset):
    from core.lake import Lake

    server = PrefectServer(tmp_path)
    server.start()
    home = tmp_path / "home"
    env = {**server.env, "FLYWHEEL_HOME": str(home), "FLYWHEEL_DATASETS_DIR": str(interaction_dataset),
           "INTERACTION_CSV": os.environ["INTERACTION_CSV"]}
    command = [sys.executable, "-m", "flows.pipeline", "--dataset", "interaction"]
    try:
        with open(tmp_path / "run1.log", "wb") as log:
            run = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline and not any(
                r["state_type"] == "RUNNING" for r in _runs(server.api, "flow_runs")):
            assert run.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            time.sleep(0.2)
        assert run.poll() is None, "the run finished before the outage could start"
        server.stop(kill=True)  # the server goes away, as in a crash
        down_at = time.time()
        time.sleep(30)
        assert run.poll() is None, ("the run gave up during the outage: "
                                    + (tmp_path / "run1.log").read_text()[-3000:])
        server.start()
        code = run.wait(timeout=600)
        output = (tmp_path / "run1.log").read_text()
        assert code == 0, output[-4000:]

        flow_runs = _runs(server.api, "flow_runs")
        assert {r["state_type"] for r in flow_runs} == {"COMPLETED"}, [(r["name"], r["state_type"]) for r in flow_runs]
        assert {r["flow_id"] for r in flow_runs} and len(flow_runs) == 3  # pipeline, ingest, etl
        task_runs = _runs(server.api, "task_runs")
        assert task_runs and {r["state_type"] for r in task_runs} == {"COMPLETED"}
        finished_after = [r for r in task_runs if r["end_time"]
                          and datetime.fromisoformat(r["end_time"].replace("Z", "+00:00")).timestamp() > down_at]
        assert finished_after, "no task finished after the outage began: the outage was not mid-run"

        lake = Lake(str(home / "lake"))
        raw_uri = lake.uri("raw", "interaction", "events")
        first = lake.read_pandas(raw_uri)
        version = lake.latest_version(raw_uri)
        assert len(first) == 3000 and first["row_id"].is_unique

        rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        again = lake.read_pandas(raw_uri)
        assert len(again) == 3000 and again["row_id"].is_unique
        assert lake.latest_version(raw_uri) == version  # nothing new to write: no commit at all
    finally:
        server.stop()
