"""``make demo --smoke``: the closed loop on real 2013 data with no hand on it. The demo starts
its own stack (Prefect server, worker, deployments, Prometheus, MLflow and Evidently UIs) on
free ports, trains on January-March, replays April as live traffic (a few days at a time, until
the loop has closed, past April when it needs to); the monitor finds drift, the automation
retrains, the new model serves as challenger and is A/B tested on ground truth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import psutil
import pytest

from tests.conftest import need_service

REPO = Path(__file__).resolve().parent.parent


def test_the_replay_goes_on_past_its_end_a_few_days_at_a_time_up_to_the_last_day():
    from devstack.demo import CHUNK_DAYS, replay_spans

    assert CHUNK_DAYS == 3
    april, may = [date(2013, 4, d) for d in (1, 30)], date(2013, 5, 7)
    assert replay_spans(*april, april[1]) == [tuple(april)]
    assert replay_spans(*april, may) == [tuple(april), (date(2013, 5, 1), date(2013, 5, 3)),
                                         (date(2013, 5, 4), date(2013, 5, 6)), (may, may)]
    # The smoke run replays in chunks from the start, so that it can stop once the loop closed.
    spans = replay_spans(date(2013, 4, 1), date(2013, 4, 8), date(2013, 4, 9), chunked=True)
    assert spans == [(date(2013, 4, 1), date(2013, 4, 3)), (date(2013, 4, 4), date(2013, 4, 6)),
                     (date(2013, 4, 7), date(2013, 4, 8)), (date(2013, 4, 9), date(2013, 4, 9))]


def test_a_replay_in_parts_adds_up_to_one_replay():
    from devstack.replay import ReplayResult

    first = ReplayResult(days=2, sent=10, feedback=8, errors=0, landed_rows=10, by_version={"champion v1": 10},
                         first_seen={"champion v1": 100.0}, sent_marks=[(100.0, 4), (101.0, 10)], behind_s=0.5,
                         landing="/l")
    later = ReplayResult(days=1, sent=5, feedback=6, errors=1, landed_rows=5,
                         by_version={"champion v1": 3, "challenger v2": 2},
                         first_seen={"champion v1": 200.0, "challenger v2": 201.0}, sent_marks=[(200.0, 5)],
                         behind_s=0.2, landing="/l")
    both = first.then(later)
    assert (both.days, both.sent, both.feedback, both.errors, both.landed_rows) == (3, 15, 14, 1, 15)
    assert both.by_version == {"champion v1": 13, "challenger v2": 2}
    assert both.first_seen == {"champion v1": 100.0, "challenger v2": 201.0}
    assert both.sent_marks == [(100.0, 4), (101.0, 10), (200.0, 15)] and both.behind_s == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("live", [pytest.param(False, marks=pytest.mark.variant), True], ids=["files", "live"])
def test_the_smoke_demo_closes_the_loop_and_leaves_nothing_running(tmp_path, live):
    """live (``--live``): each day's flights are published to a Redis stream, and the stream
    deployment's consumer commits them to the lake through the gate; each day's weather lands as
    a file for the scheduled ingest. files (``make demo``'s default): flights land as files too.

    ``make test`` runs the live demo alone (each demo costs about four minutes of the suite): it
    passes through the files demo's parts (daily files, here weather's, through the scheduled
    ingest; the whole loop) and the stream besides. What only the files demo runs is its own
    contract, ``flights_demo``, whose flights are a folder of daily files like weather's.
    ``pytest -m variant`` runs it."""
    if not shutil.which("prometheus"):
        need_service("Prometheus is not installed (apt-get install prometheus prometheus-pushgateway "
                     "prometheus-alertmanager)")
    if live and not shutil.which("redis-server"):
        need_service("redis-server is not installed (apt-get install redis-server)")
    home = tmp_path / "home"
    env = {**os.environ, "FLYWHEEL_HOME": str(home)}
    for key in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(key, None)
    before = {p.pid for p in psutil.process_iter()}
    done = subprocess.run([sys.executable, "-m", "devstack.demo", "--smoke", *(["--live"] if live else [])], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
    output = done.stdout[-6000:] + done.stderr[-4000:]
    assert done.returncode == 0, output
    timeline = json.loads((home / "demo" / "timeline.json").read_text())
    happened = [entry["what"] for entry in timeline["timeline"]]
    steps = ["model.registered", "service up", "prometheus scrapes the service", "drift.detected",
             "train run started", "replay finished"]
    steps += ["stream consumer started", "history published", "history in the lake"] if live else ["history landed"]
    for step in steps:
        assert step in happened, (step, happened)
    reactions = timeline["reactions"]
    assert reactions["retrain_started_s"] is not None and reactions["retrain_started_s"] > 0
    assert timeline["replay"]["errors"] == 0
    # The loop closed: a retrained model served as challenger and the A/B decided about it on
    # ground truth, each arm with its minimum of labelled rows (the decision is the data's).
    assert reactions["challenger_serving_s"] > reactions["retrain_started_s"], reactions
    version = reactions["challenger_version"]
    assert timeline["replay"]["by_version"].get(f"challenger v{version}", 0) > 0
    assert reactions["ab_decided_s"] > reactions["challenger_serving_s"], reactions
    assert not reactions["ab_decision"].startswith("keep: not enough ground truth"), reactions
    assert "Reaction times" in done.stdout and "retrain started" in done.stdout

    # The lake saw the replayed days through the scheduled ingest or the retrain's refresh.
    from core.lake import Lake

    lake = Lake(str(home / "lake"))
    if live:  # the stream's messages, each once, with their ids; April's arrived while the demo ran
        flights = lake.read_pandas(lake.uri("raw", "flights_live", "flights"), columns=["month", "_flywheel_stream_id"])
        assert flights["_flywheel_stream_id"].is_unique
    else:
        flights = lake.read_pandas(lake.uri("raw", "flights_demo", "flights"), columns=["month"])
    assert 4 <= flights["month"].max() <= date.fromisoformat(timeline["replayed_to"]).month
    # The demo's own stack is down: none of the processes it started is left (Redis rewrites its
    # command line, so it is found by name).
    left = [p for p in psutil.process_iter(["pid", "cmdline", "name"]) if p.pid not in before
            and (str(home) in " ".join(p.info["cmdline"] or []) or p.info["name"] == "redis-server")]
    assert not left, [" ".join(p.info["cmdline"])[:200] for p in left]
