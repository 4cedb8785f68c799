"""A SIGKILLed entry point leaves nothing behind: the processes it started for itself end with
it, and its MLflow run is ended KILLED when the next run starts."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


def _same(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(seen: dict[int, float], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [pid for pid, started in seen.items() if _same(pid, started)]
        if not left:
            return []
        time.sleep(0.2)
    return left


def test_tied_processes_end_with_a_sigkilled_owner_and_others_are_left_alone(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        from core.lifetime import guard, marked, tie
        assert guard()
        tied = subprocess.Popen(["sleep", "300"], start_new_session=True)
        free = subprocess.Popen(["sleep", "301"], start_new_session=True)
        tie([tied.pid])
        with marked():  # started by a child that exits at once: re-parented, never a descendant
            out = subprocess.run(["sh", "-c", "sleep 302 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
        print(tied.pid, free.pid, out.stdout.strip(), flush=True)
        time.sleep(300)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    tied, free, orphan = (int(x) for x in owner.stdout.readline().split())
    started = {pid: psutil.Process(pid).create_time() for pid in (tied, free, orphan)}
    assert psutil.Process(orphan).ppid() != owner.pid
    time.sleep(0.5)  # the watcher has read the tie
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    try:
        assert _wait_gone({tied: started[tied]}, 15) == [], "a tied process outlived its SIGKILLed owner"
        assert _wait_gone({orphan: started[orphan]}, 15) == [], "a marked, re-parented process outlived its owner"
        assert _same(free, started[free]), "a process nobody tied was ended (a served model would be)"
    finally:
        for pid in (free, orphan):
            if _same(pid, started[pid]):
                psutil.Process(pid).kill()


@pytest.mark.slow
def test_a_sigkilled_train_leaves_no_process_and_its_mlflow_run_ends_killed_at_the_next_start(tmp_path):
    """Found: after `kill -9` of `flows.train` during tuning, Prefect's temporary API server ran
    on (re-parented to PID 1) and the MLflow run stayed RUNNING for ever."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "FLYWHEEL_"))}
    env["FLYWHEEL_HOME"] = str(home)
    log = (tmp_path / "train.log").open("w")
    train = subprocess.Popen([sys.executable, "-m", "flows.train", "--smoke-test"], cwd=REPO, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    process = psutil.Process(train.pid)
    seen: dict[int, tuple[float, str]] = {}

    def running_runs() -> list[str]:
        try:
            with sqlite3.connect(home / "mlflow.db") as db:
                return [r[0] for r in db.execute("select run_uuid from runs where status = 'RUNNING'")]
        except sqlite3.Error:
            return []

    deadline = time.time() + 240
    try:
        while time.time() < deadline and train.poll() is None:
            for child in process.children(recursive=True):
                try:
                    seen[child.pid] = (child.create_time(), " ".join(child.cmdline()))
                except psutil.Error:
                    continue
            commands = " ".join(command for _, command in seen.values())
            if "raylet" in commands and "prefect.server" in commands and running_runs():
                break  # tuning on a local Ray, reporting to a temporary Prefect server
            time.sleep(0.2)
        assert train.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        killed_runs = running_runs()
        assert len(killed_runs) == 1
        train.send_signal(signal.SIGKILL)
        train.wait()
    finally:
        if train.poll() is None:
            train.kill()
    # Everything the command started is gone, Ray's dashboard and runtime-env agents included
    # (the raylet dies with the command at once, and they were re-parented to PID 1).
    left = _wait_gone({pid: started for pid, (started, _) in seen.items()}, 20)
    for pid in left:
        psutil.Process(pid).kill()  # not to leak into later tests
    assert not left, [seen[pid][1][:150] for pid in left]

    # The next start: the killed run ends KILLED, saying why; a run whose process lives is left.
    from mlflow import MlflowClient

    from tasks.tracking import configure_mlflow, end_orphaned_runs, parent_run

    uri = f"sqlite:///{home / 'mlflow.db'}"
    experiment = configure_mlflow(uri, str(home / "mlartifacts"), "flywheel-flights-smoke")
    with parent_run(experiment, "alive", {}) as alive:
        assert end_orphaned_runs(experiment) == []  # the killed one went when this run started
        client = MlflowClient(uri)
        ended = client.get_run(killed_runs[0])
        assert ended.info.status == "KILLED" and "was gone" in ended.data.tags["flywheel.ended"]
        assert client.get_run(alive.info.run_id).info.status == "RUNNING"
