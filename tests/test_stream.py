"""Streaming ingest from a real Redis (Debian's redis-server on 127.0.0.1) into the lake:
through the gate, exactly once, whatever is killed when; poison never blocks the stream."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import PrefectServer, free_port, need_service, write_contract

REPO = Path(__file__).resolve().parent.parent

CONTRACT = """\
    name: live
    base_table: events
    tables:
      events:
        source: {{kind: stream, url: "redis://127.0.0.1:{port}/0", stream: "{stream}", batch_rows: {batch},
                  max_wait_ms: 200, max_deliveries: {deliveries}}}
        max_bad_row_fraction: 0.5
        columns:
          id: {{type: int}}
          at: {{type: datetime}}
          kind: {{type: str, allowed: [a, b]}}
          value: {{type: float, min: 0}}
    target: {{column: value, kind: regression}}
    features: {{categorical: [kind], numeric: []}}
    time_column: at
    """


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        need_service("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    client = redis.Redis(port=port)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            time.sleep(0.1)
    yield port
    server.terminate()
    server.wait(timeout=20)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """One Prefect server for the module's consumer processes (each starts in ~2 s against it)."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect"))
    server.start()
    yield server.env
    server.stop()


def live_dataset(tmp_path: Path, port: int, stream: str, batch: int = 500, deliveries: int = 5) -> Path:
    folder = tmp_path / "datasets"
    write_contract(folder, "live", CONTRACT.format(port=port, stream=stream, batch=batch, deliveries=deliveries))
    return folder


def events(n: int, start: int = 0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": np.arange(start, start + n), "at": pd.date_range("2024-01-01", periods=n, freq="s",
                                                                               tz="UTC") + pd.Timedelta(seconds=start),
                         "kind": rng.choice(["a", "b"], n), "value": rng.random(n)})


def consume(tmp_path: Path, datasets: Path, env: dict, fault: str | None = None, idle_s: float = 2.0,
            timeout: float = 300) -> subprocess.CompletedProcess:
    run_env = {**env, "FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_DATASETS_DIR": str(datasets)}
    run_env.pop("FLYWHEEL_STREAM_FAULT", None)
    if fault:
        run_env["FLYWHEEL_STREAM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "flows.stream", "--dataset", "live", "--until-idle-s", str(idle_s)],
                          cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)


def lake_state(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    from core.lake import Lake

    lake = Lake(str(tmp_path / "home" / "lake"))
    raw = lake.read_pandas(lake.uri("raw", "live", "events"))
    quarantine_uri = lake.uri("quarantine", "live", "events")
    quarantine = lake.read_pandas(quarantine_uri) if lake.exists(quarantine_uri) else pd.DataFrame(
        columns=["_flywheel_stream_id"])
    return raw, quarantine


def pending(port: int, stream: str) -> int:
    import redis

    return int(redis.Redis(port=port).xpending(stream, "flywheel")["pending"])


def test_decode_types_fields_and_names_every_poison_message():
    from core.contract import TableSpec
    from core.stream import STREAM_ID, decode, id_of, position_of

    spec = TableSpec.model_validate({"source": {"kind": "stream", "stream": "s"}, "columns": {
        "id": {"type": "int"}, "at": {"type": "datetime"}, "kind": {"type": "str"},
        "value": {"type": "float", "nullable": True}}})
    messages = [("1-0", {"id": "1", "at": "2024-01-01T00:00:00Z", "kind": "a", "value": "0.5"}),
                ("1-1", {"id": "2", "at": "2024-01-01T00:00:01Z", "kind": "b", "value": ""}),
                ("2-0", None),
                ("2-1", {"garbage": "x"}),
                ("3-0", {"id": "x3", "at": "2024-01-01", "kind": "a", "value": "1"}),
                ("3-1", {"id": "4", "at": "yesterday", "kind": "a", "value": "1"}),
                ("3-2", {"id": "5.5", "at": "2024-01-01", "kind": "a", "value": "1"})]
    good, poison = decode(messages, spec)
    assert good[STREAM_ID].tolist() == ["1-0", "1-1"]
    assert good["id"].tolist() == [1, 2] and pd.isna(good["value"].iloc[1])
    assert str(good["at"].dtype).startswith("datetime64") and good["value"].dtype == float
    reasons = dict(zip(poison[STREAM_ID], poison["reason"], strict=True))
    assert set(reasons) == {"2-0", "2-1", "3-0", "3-1", "3-2"}
    assert "no fields" in reasons["2-0"] and "garbage" in reasons["2-1"]
    assert "'x3' is not of type int" in reasons["3-0"] and "'yesterday'" in reasons["3-1"]
    assert "'5.5' is not of type int" in reasons["3-2"]
    assert position_of("1700000000000-7") > position_of("1700000000000-6") > position_of("1699999999999-99")
    assert id_of(position_of("1700000000000-7")) == "1700000000000-7"


@pytest.mark.slow
def test_a_stream_lands_through_the_gate_with_poison_quarantined_by_message_id(tmp_path, redis_port, prefect_api):
    from core.stream import publish

    stream = "t:gate"
    datasets = live_dataset(tmp_path, redis_port, stream)
    frame = events(3000)
    frame.loc[10, "value"] = -1.0  # the gate quarantines it (min 0)
    frame.loc[20, "kind"] = "z"  # not allowed
    ids = publish(f"redis://127.0.0.1:{redis_port}/0", stream, frame)
    import redis

    client = redis.Redis(port=redis_port, decode_responses=True)
    poison = [client.xadd(stream, {"id": "not a number", "at": "2024-01-01", "kind": "a", "value": "1"}),
              client.xadd(stream, {"unknown": "field"})]
    more = publish(f"redis://127.0.0.1:{redis_port}/0", stream, events(500, start=3000))  # behind the poison
    done = consume(tmp_path, datasets, prefect_api)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw, quarantine = lake_state(tmp_path)
    expected = set(ids + more) - {ids[10], ids[20]}
    assert set(raw["_flywheel_stream_id"]) == expected and raw["_flywheel_stream_id"].is_unique
    assert set(quarantine["_flywheel_stream_id"]) == {ids[10], ids[20], *poison}
    assert len(raw) + len(quarantine) == 3000 + 2 + 500  # rows in == accepted + quarantined
    reasons = dict(zip(quarantine["_flywheel_stream_id"], quarantine["_flywheel_reasons"], strict=True))
    assert "not of type int" in reasons[poison[0]] and "unknown" in reasons[poison[1]]
    assert raw.set_index("id").loc[5, "value"] == pytest.approx(frame.loc[5, "value"])
    assert pending(redis_port, stream) == 0
    assert "3,502 messages" in done.stdout and "latency" in done.stdout

    again = consume(tmp_path, datasets, prefect_api, idle_s=1)  # nothing new: nothing written
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(lake_state(tmp_path)[0]) == len(raw)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
def test_a_consumer_killed_at_each_step_ends_with_every_message_once(tmp_path, redis_port, prefect_api, point):
    from core.stream import publish

    stream = f"t:kill:{point}"
    datasets = live_dataset(tmp_path, redis_port, stream, batch=400)
    ids = publish(f"redis://127.0.0.1:{redis_port}/0", stream, events(2000))
    killed = consume(tmp_path, datasets, prefect_api, fault=f"{point}:2")
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert pending(redis_port, stream) > 0  # delivered, never acknowledged
    done = consume(tmp_path, datasets, prefect_api)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw, quarantine = lake_state(tmp_path)
    assert sorted(raw["_flywheel_stream_id"]) == sorted(ids), "lost or duplicated messages"
    assert quarantine.empty
    assert pending(redis_port, stream) == 0
    if point == "after_commit":  # the batch was in the lake: only acknowledged on restart
        assert "the lake already holds" in done.stdout + done.stderr


@pytest.mark.slow
def test_a_consumer_killed_during_a_burst_and_restarted_holds_every_message_once(tmp_path, redis_port, prefect_api):
    from core.stream import publish

    stream = "t:burst"
    url = f"redis://127.0.0.1:{redis_port}/0"
    datasets = live_dataset(tmp_path, redis_port, stream, batch=300)
    sent: list[str] = []

    def burst() -> None:
        for i in range(10):
            sent.extend(publish(url, stream, events(1000, start=i * 1000, seed=i)))
            time.sleep(0.3)

    env = {**prefect_api, "FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_DATASETS_DIR": str(datasets)}
    consumer = subprocess.Popen([sys.executable, "-m", "flows.stream", "--dataset", "live"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    producer = threading.Thread(target=burst)
    producer.start()
    from core.lake import Lake

    lake = Lake(str(tmp_path / "home" / "lake"))
    uri = lake.uri("raw", "live", "events")
    deadline = time.time() + 120
    while time.time() < deadline and not (lake.exists(uri) and lake.table(uri).version() >= 2):
        time.sleep(0.05)
    os.kill(consumer.pid, signal.SIGKILL)  # mid-burst, between whatever steps it was at
    consumer.wait()
    producer.join()
    done = consume(tmp_path, datasets, prefect_api)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw, _ = lake_state(tmp_path)
    assert len(sent) == 10_000
    assert sorted(raw["_flywheel_stream_id"]) == sorted(sent), "lost or duplicated messages"
    assert pending(redis_port, stream) == 0


@pytest.mark.slow
def test_a_batch_the_gate_rejects_is_parked_and_the_consumer_goes_on(tmp_path, redis_port, prefect_api):
    from core.stream import publish

    stream = "t:reject"
    url = f"redis://127.0.0.1:{redis_port}/0"
    datasets = live_dataset(tmp_path, redis_port, stream, batch=100)
    bad = events(100)
    bad["value"] = -1.0  # every row fails a row check: above the 50% the contract allows
    rejected = publish(url, stream, bad)
    good = publish(url, stream, events(250, start=100))
    done = consume(tmp_path, datasets, prefect_api)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw, quarantine = lake_state(tmp_path)
    assert sorted(raw["_flywheel_stream_id"]) == sorted(good)
    parked = list((tmp_path / "home" / "rejected" / "live" / "events").glob("stream-*.jsonl"))
    assert len(parked) == 1 and rejected[0] in parked[0].name
    assert len(parked[0].read_text().splitlines()) == 1 + 100  # the reason, then every message
    assert pending(redis_port, stream) == 0


@pytest.mark.slow
def test_messages_that_crash_the_consumer_every_time_are_quarantined_after_max_deliveries(tmp_path, redis_port,
                                                                                          prefect_api):
    from core.stream import publish

    stream = "t:crash"
    datasets = live_dataset(tmp_path, redis_port, stream, batch=100, deliveries=3)
    ids = publish(f"redis://127.0.0.1:{redis_port}/0", stream, events(50))
    for _ in range(3):  # the same messages kill the consumer at each start
        crashed = consume(tmp_path, datasets, prefect_api, fault="before_commit:1")
        assert crashed.returncode == -signal.SIGKILL, crashed.stdout[-2000:] + crashed.stderr[-2000:]
    done = consume(tmp_path, datasets, prefect_api)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw, quarantine = lake_state(tmp_path)
    assert raw.empty
    assert sorted(quarantine["_flywheel_stream_id"]) == sorted(ids) and quarantine["_flywheel_stream_id"].is_unique
    assert quarantine["_flywheel_reasons"].str.contains("delivered 3\\+ times").all()
    assert pending(redis_port, stream) == 0
