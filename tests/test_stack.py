"""``make up`` / ``make down`` (``python -m devstack``) on free ports in a fresh home: every
part answers on 127.0.0.1 and nowhere else, the deployments are registered, a second ``up``
refuses, and ``down`` stops exactly the recorded processes (a reused process id is left alone)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.conftest import need_service

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def listening(pid: int) -> set[tuple[str, int]]:
    """Addresses the process and its children listen on."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for process in processes:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_up_starts_every_part_on_loopback_and_down_stops_exactly_those(tmp_path):
    if not shutil.which("prometheus"):
        need_service("Prometheus is not installed (apt-get install prometheus prometheus-pushgateway "
                     "prometheus-alertmanager)")
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home")}
    for key in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(key, None)
    stack = [sys.executable, "-m", "devstack"]
    up = subprocess.run([*stack, "up", "--free-ports"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=400)
    from core.settings import configure
    from devstack.stack import read_stack

    settings = configure(home=str(tmp_path / "home"))
    state = read_stack(settings)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert state is not None
        names = [p.name for p in state.parts]
        assert names == ["prefect-server", "worker", "pushgateway", "alertmanager", "prometheus", "redis",
                         "mlflow-ui", "evidently-ui"]
        assert "flywheel-flights has no champion yet" in up.stdout  # nothing to serve in a fresh home
        for part in state.parts:
            if part.url and part.url.startswith("http"):
                assert requests.get(part.url, timeout=10).status_code < 400, part
                assert part.url in up.stdout
        import redis

        assert redis.Redis.from_url(state.env()["FLYWHEEL_REDIS_URL"]).ping()  # the streams' Redis answers
        ports = state.ports
        deployments = requests.post(f"http://127.0.0.1:{ports.prefect}/api/deployments/filter", json={},
                                    timeout=10).json()
        assert {d["name"] for d in deployments} >= {"train", "monitor", "evaluate-hourly", "serve-registered"}
        workers = requests.post(f"http://127.0.0.1:{ports.prefect}/api/work_pools/flywheel-local/workers/filter",
                                json={}, timeout=10).json()
        deadline = time.time() + 30
        while not workers and time.time() < deadline:
            time.sleep(1)
            workers = requests.post(f"http://127.0.0.1:{ports.prefect}/api/work_pools/flywheel-local/workers/filter",
                                    json={}, timeout=10).json()
        assert workers, "the worker never polled the work pool"
        # Prometheus finds services through this home's target files (serving.control writes them).
        loaded = requests.get(f"http://127.0.0.1:{ports.prometheus}/api/v1/status/config", timeout=10).json()
        (serving_job,) = [job for job in yaml.safe_load(loaded["data"]["yaml"])["scrape_configs"]
                          if job["job_name"] == "flywheel-serving"]
        assert serving_job["file_sd_configs"][0]["files"] == [str(Path(state.home) / "prometheus" / "targets" / "*.json")]
        for part in state.parts:
            addresses = listening(part.pid)
            assert all(ip == "127.0.0.1" for ip, _ in addresses), (part.name, addresses)
        again = subprocess.run([*stack, "up", "--free-ports"], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 1 and "already up" in again.stderr

        # With the stack up and no PREFECT_API_URL, `python -m flows.*` reports to its server:
        # the run is in the UI (issue 20), not on a temporary server that ends with the command.
        run = subprocess.run([sys.executable, "-m", "flows.deploy", "stop"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        assert f"reporting to the Prefect server of the running stack (http://127.0.0.1:{ports.prefect})" in run.stderr
        runs = requests.post(f"http://127.0.0.1:{ports.prefect}/api/flow_runs/filter", timeout=10,
                             json={"flows": {"name": {"any_": ["deploy"]}}}).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"], runs

        # supervisord restarts a part that dies (here the worker, killed outright), and status says so.
        from devstack.stack import part_info, status

        (worker,) = [p for p in state.parts if p.name == "worker"]
        killed = part_info(worker)["pid"]
        os.kill(killed, 9)
        deadline = time.time() + 30
        while time.time() < deadline:
            info = part_info(worker)
            if info["statename"] == "RUNNING" and info["pid"] != killed:
                break
            time.sleep(0.5)
        assert info["statename"] == "RUNNING" and info["pid"] != killed, info
        assert status(settings)["worker"] == {**status(settings)["worker"], "running": True, "pid": info["pid"]}
        shown = subprocess.run([*stack, "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert "worker" in shown.stdout and "RUNNING" in shown.stdout, shown.stdout

        # A recorded id now held by another program is not ours to stop.
        stranger = subprocess.Popen(["sleep", "300"])
        state.parts.append(type(state.parts[0])("ghost", stranger.pid, ["/bin/ghost-of-a-part"], None, "x"))
        from devstack.stack import _write

        _write(state, settings)
        # The record of a service whose process is gone (its id now another program's) goes
        # with its Prometheus target, and that program is left alone.
        from serving.control import Served, _write_state, state_file, target_file, write_target

        stale = Served(stranger.pid, "127.0.0.1", ports.service, "flights", "flywheel-flights", "lake", 0.1, False,
                       None, time.time(), "log", None, str(target_file(settings, "flywheel-flights", ports.service)))
        _write_state(state_file(settings, "flywheel-flights"), stale)
        assert write_target(stale) is not None
        down = subprocess.run([*stack, "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
        assert not state_file(settings, "flywheel-flights").exists() and not Path(str(stale.target)).exists()
        assert "service flywheel-flights" not in down.stdout
        for part in state.parts[:-1]:
            assert f"{part.name} (supervised)" in down.stdout
            pid = info["pid"] if part.name == "worker" else part.pid
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert "supervisord (process" in down.stdout
        assert stranger.poll() is None, "down stopped a process it did not start"
        stranger.kill()
        assert read_stack(settings) is None
    finally:
        subprocess.run([*stack, "down"], cwd=REPO, env=env, capture_output=True, timeout=300)
        configure()


def test_a_flow_command_finds_the_running_stack_only_when_it_answers(tmp_path, monkeypatch):
    """``flows._runtime.use_running_stack``: the stack's record and a port that answers give
    PREFECT_API_URL; no record, a record without a Prefect server, or a dead port give none."""
    import json
    import socket

    from flows._runtime import STACK_STATE, use_running_stack

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    home = tmp_path / "home"
    assert use_running_stack(["--home", str(home)]) is None
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    record = home.joinpath(*STACK_STATE)
    record.parent.mkdir(parents=True)
    try:  # whatever fails, no PREFECT_API_URL to a dead port is left to the tests after this one
        record.write_text(json.dumps({"ports": {"prefect": port}, "parts": [{"name": "worker"}]}))
        assert use_running_stack([f"--home={home}"]) is None  # no Prefect server in the record
        record.write_text(json.dumps({"ports": {"prefect": port}, "parts": [{"name": "prefect-server"}]}))
        assert use_running_stack(["train", "--home", str(home)]) == f"http://127.0.0.1:{port}/api"
        assert os.environ.pop("PREFECT_API_URL") == f"http://127.0.0.1:{port}/api"
        listener.close()
        assert use_running_stack(["--home", str(home)]) is None and "PREFECT_API_URL" not in os.environ
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        listener.close()
