"""The cluster profile's lake on object storage: an S3 API server on 127.0.0.1 (moto's server
mode; real AWS takes the same settings without the endpoint), reached by configuration alone
(``lake_root: s3://...`` and the standard AWS environment variables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.lake import Lake
from tests.conftest import REPO
from tests.test_ingest import contract_for, events

WORKER = REPO / "tests" / "ingest_worker.py"


def _ingest(contract: Path, lake_root: str, source: Path, env: dict[str, str], start_at: float) -> subprocess.Popen:
    run_env = {**os.environ, **env, "PYTHONPATH": str(REPO), "EVENTS_CSV": str(source)}
    return subprocess.Popen([sys.executable, str(WORKER), str(contract), lake_root, "events", "--start-at",
                             str(start_at), "--delay-commit", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=run_env)


@pytest.mark.slow
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
def test_four_concurrent_ingests_on_s3_neither_lose_nor_duplicate_a_batch(tmp_path, s3_server, keyed, monkeypatch):
    """Four ingest processes commit to one Delta table on S3 at the same moment: three
    different batches, and the first of them twice. Each batch lands once; none is lost.
    (deltalake 1.6 takes each log entry with an S3 conditional put; a writer that loses the race
    plans again on the new snapshot.)"""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.bucket(f"lake-{'k' if keyed else 'u'}-{int(time.time() * 1000)}")
    root = f"s3://{bucket}/flywheel/lake"
    contract = contract_for(tmp_path / "datasets", keyed=keyed)
    batches = []
    for index, start in enumerate([1, 10_001, 20_001]):
        path = tmp_path / f"batch-{index}.csv"
        events(1500, bad=15, start=start).to_csv(path, index=False)
        batches.append(path)
    start_at = time.time() + 15  # all four begin committing together, after their imports
    procs = [_ingest(contract, root, source, s3_server.env(), start_at) for source in [*batches, batches[0]]]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"stdout: {out[-2000:]}\nstderr: {err[-3000:]}"
        outcomes.append(json.loads(next(x for x in out.splitlines() if x.startswith("OUTCOME "))
                                   .removeprefix("OUTCOME ")))
    lake = Lake(root)
    raw = lake.read_pandas(lake.uri("raw", "events", "events"))
    expected = set(range(16, 1501)) | set(range(10_016, 11_501)) | set(range(20_016, 21_501))
    assert set(raw["event_id"]) == expected and raw["event_id"].is_unique, "a batch was lost or written twice"
    held = lake.read_pandas(lake.uri("quarantine", "events", "events"))
    assert len(held) == 45 and held["event_id"].is_unique
    for outcome in outcomes:
        assert outcome["rows_in"] == outcome["accepted"] + outcome["quarantined"] == 1500
    # nothing was written to the local disk: the lake is the bucket
    assert not (tmp_path / "lake").exists()
    history = lake.table(lake.uri("raw", "events", "events")).history()
    assert all(s3_server.secret_key not in json.dumps(entry) and s3_server.access_key not in json.dumps(entry)
               for entry in history), "a credential reached a Delta commit"
