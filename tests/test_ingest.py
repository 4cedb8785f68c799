"""Ingestion under real use: daily reruns, grown and changed sources, two ingests at once, a
kill at each step. Each run goes through the real gate and the real lake writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.contract import load_contract
from core.ingest import batch_fingerprint, read_batch, write_batch
from core.lake import Lake
from core.validation import validate
from tests.conftest import write_contract

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "ingest_worker.py"


def events(n: int, bad: int = 0, start: int = 1) -> pd.DataFrame:
    """n events with unique ids; the first ``bad`` have an out-of-range score (quarantined)."""
    ids = np.arange(start, start + n)  # each row a function of its id: a grown file keeps its rows
    frame = pd.DataFrame({
        "event_id": ids,
        "at": (pd.Timestamp("2024-01-01") + pd.to_timedelta(ids, unit="min")).astype(str),
        "kind": np.array(["a", "b", "c"])[ids % 3],
        "score": ((ids * 0.6180339887) % 1).round(6),
    })
    frame.loc[: bad - 1, "score"] = 5.0 if bad else frame["score"]
    return frame


def contract_for(folder: Path, keyed: bool = True, on_key_conflict: str = "update") -> Path:
    key = "primary_key: [event_id]" if keyed else ""
    return write_contract(folder, "events", f"""\
        name: events
        base_table: events
        tables:
          events:
            source: {{kind: file, path: "${{EVENTS_CSV}}"}}
            {key}
            on_key_conflict: {on_key_conflict}
            max_bad_row_fraction: 0.1
            columns:
              event_id: {{type: int}}
              at: {{type: datetime, timezone: UTC}}
              kind: {{type: str, allowed: [a, b, c]}}
              score: {{type: float, min: 0, max: 1}}
        target: {{column: score, kind: regression}}
        features: {{categorical: [kind]}}
        time_column: at
        """)


@pytest.fixture
def events_csv(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "events.csv"
    monkeypatch.setenv("EVENTS_CSV", str(path))
    return path


def ingest_once(lake: Lake, contract_path: Path) -> dict:
    contract = load_contract(contract_path)
    batch, source = read_batch("events", contract.tables["events"])
    result = validate(batch, "events", contract.tables["events"])
    return write_batch(lake, contract, result, source, batch_fingerprint(batch)).as_row()


def raw(lake: Lake) -> pd.DataFrame:
    return lake.read_pandas(lake.uri("raw", "events", "events"))


def quarantine(lake: Lake) -> pd.DataFrame:
    return lake.read_pandas(lake.uri("quarantine", "events", "events"))


def test_a_grown_source_appends_only_its_new_rows(tmp_path, events_csv):
    """Found: a source that grew by one row was appended again whole (4,001 rows, 2,000
    duplicate keys)."""
    path = contract_for(tmp_path / "datasets")
    lake = Lake(str(tmp_path / "lake"))
    events(2000).to_csv(events_csv, index=False)
    first = ingest_once(lake, path)
    assert (first["inserted"], first["unchanged"], first["raw_version"]) == (2000, 0, 1)

    again = ingest_once(lake, path)  # the same file: nothing written, no new version
    assert (again["inserted"], again["unchanged"], again["skipped"], again["raw_version"]) == (0, 2000, True, 1)

    events(2001).to_csv(events_csv, index=False)
    grown = ingest_once(lake, path)
    assert (grown["inserted"], grown["updated"], grown["unchanged"]) == (1, 0, 2000)
    table = raw(lake)
    assert len(table) == 2001 and table["event_id"].is_unique
    meta = lake.commit_metadata(lake.uri("raw", "events", "events"))
    counts = {k: int(meta[f"flywheel.rows_{k}"]) for k in ("in", "inserted", "updated", "unchanged", "quarantined")}
    assert counts == {"in": 2001, "inserted": 1, "updated": 0, "unchanged": 2000, "quarantined": 0}


@pytest.mark.parametrize("on_key_conflict", ["update", "quarantine"])
def test_a_changed_row_is_updated_or_quarantined_as_the_contract_says(tmp_path, events_csv, on_key_conflict):
    path = contract_for(tmp_path / "datasets", on_key_conflict=on_key_conflict)
    lake = Lake(str(tmp_path / "lake"))
    batch = events(500)
    batch.to_csv(events_csv, index=False)
    ingest_once(lake, path)
    batch.loc[10, "score"] = 0.123456  # a correction in the source
    batch.to_csv(events_csv, index=False)
    outcome = ingest_once(lake, path)
    table = raw(lake).set_index("event_id")
    assert len(table) == 500 and outcome["rows_in"] == outcome["accepted"] + outcome["quarantined"]
    if on_key_conflict == "update":
        assert (outcome["updated"], outcome["unchanged"], outcome["quarantined"]) == (1, 499, 0)
        assert table.loc[11, "score"] == pytest.approx(0.123456)
    else:
        assert (outcome["updated"], outcome["conflicts"], outcome["quarantined"]) == (0, 1, 1)
        assert table.loc[11, "score"] != pytest.approx(0.123456)
        held = quarantine(lake)
        assert held["event_id"].tolist() == [11]
        assert held["_flywheel_reasons"].str.startswith("key_conflict(event_id)").all()


def test_a_table_without_a_key_appends_each_batch_once(tmp_path, events_csv):
    path = contract_for(tmp_path / "datasets", keyed=False)
    lake = Lake(str(tmp_path / "lake"))
    events(300).to_csv(events_csv, index=False)
    assert ingest_once(lake, path)["inserted"] == 300
    assert ingest_once(lake, path)["skipped"]
    events(300, start=301).to_csv(events_csv, index=False)  # the next day's file
    assert ingest_once(lake, path)["inserted"] == 300
    assert len(raw(lake)) == 600


def _worker(contract: Path, lake: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(WORKER), str(contract), str(lake), "events", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _outcome(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {out[-2000:]}\nstderr: {err[-3000:]}"
    line = next(x for x in out.splitlines() if x.startswith("OUTCOME "))
    return json.loads(line.removeprefix("OUTCOME "))


@pytest.mark.slow
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
def test_two_ingests_at_once_write_each_row_once(tmp_path, events_csv, keyed):
    """Found: two concurrent ingests both exit 0 and the table holds the batch twice (every
    time once the gap between check and commit is widened, as here)."""
    path = contract_for(tmp_path / "datasets", keyed=keyed)
    lake_path = tmp_path / "lake"
    events(3000, bad=30).to_csv(events_csv, index=False)
    start = str(time.time() + 12)  # both begin writing at the same moment, after their imports
    procs = [_worker(path, lake_path, "--delay-commit", "1.0", "--start-at", start) for _ in range(2)]
    outcomes = [_outcome(p) for p in procs]
    lake = Lake(str(lake_path))
    table = raw(lake)
    assert len(table) == 2970 and table["event_id"].is_unique
    assert sorted(o["inserted"] for o in outcomes) == [0, 2970]
    assert sorted(o["unchanged"] for o in outcomes) == [0, 2970]
    held = quarantine(lake)
    assert len(held) == 30 and held["event_id"].is_unique
    for outcome in outcomes:
        assert outcome["rows_in"] == outcome["accepted"] + outcome["quarantined"] == 3000


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["before:1", "after:1", "before:2", "after:2"])
def test_a_kill_at_any_step_then_a_rerun_leaves_each_row_once(tmp_path, events_csv, kill):
    """Found: a kill between the quarantine commit and the raw commit duplicated the
    quarantined rows on rerun (100 -> 200). Commit 1 is the quarantine, 2 the raw table."""
    path = contract_for(tmp_path / "datasets")
    lake_path = tmp_path / "lake"
    events(2000, bad=100).to_csv(events_csv, index=False)
    proc = _worker(path, lake_path, "--kill", kill)
    proc.communicate(timeout=300)
    assert proc.returncode == -9  # SIGKILL, as the OOM killer or `kill -9` would
    lake = Lake(str(lake_path))
    rerun = ingest_once(lake, path)
    assert rerun["rows_in"] == rerun["accepted"] + rerun["quarantined"] == 2000
    table = raw(lake)
    assert len(table) == 1900 and table["event_id"].is_unique
    held = quarantine(lake)
    assert len(held) == 100 and held["event_id"].is_unique
    again = ingest_once(lake, path)  # and a further rerun changes nothing
    assert again["skipped"] and len(quarantine(lake)) == 100


def test_a_writer_whose_schema_merge_lost_the_race_is_told_to_plan_again(tmp_path):
    """Found in CI: four ingests on S3, two of them merging the quarantine table's schema at
    once; the loser's "Metadata changed since last commit" ended its process (exit 1) instead
    of re-planning on the new snapshot, as every other lost race does."""
    import pyarrow as pa

    from core.lake import ConcurrentWriteError

    lake = Lake(str(tmp_path / "lake"))
    uri = lake.uri("quarantine", "events", "events")
    lake.open_or_create(uri, pa.schema([("a", pa.int64())]))
    first, second = lake.table(uri), lake.table(uri)
    lake.commit(first, pa.table({"a": [1], "b": [1]}), {"flywheel.test": "first"})
    with pytest.raises(ConcurrentWriteError):
        lake.commit(second, pa.table({"a": [2], "c": [1.0]}), {"flywheel.test": "second"})
    again = lake.table(uri)  # planned again on the new snapshot, the rows land
    lake.commit(again, pa.table({"a": [2], "c": [1.0]}), {"flywheel.test": "second"})
    assert sorted(lake.read_pandas(uri)["a"]) == [1, 2]
