"""Serving side by side: the BentoML service vs a bare Starlette endpoint, same model, same transform.

    python -m benchmarks.serving                    # needs `make train` first (the flights champion)
    python -m benchmarks.serving --seconds 5 --soak-seconds 30     # a quick look

Three servers, each started fresh on 127.0.0.1 and driven by the same asyncio load generator
(aiohttp, one record per request, a random routing key each) at concurrency 1, 16 and 64:

- ``bare``: a Starlette app under uvicorn that loads the same registered model and lookups and
  scores each request with the service's own transform (``serving.features``): no validation,
  routing, batching, metrics or logging. The baseline.
- ``service``: the real service (``serving.control.start`` -> ``bentoml serve``) with a challenger,
  A/B routing (half the keys), metrics and the prediction log on.
- ``unbatched``: the same service with ``serving.max_batch_size = 1``.

Then a soak: the service at a steady rate for ``--soak-seconds`` (default 300): resident memory
of the service's process tree at the start and end, errors, and, after a graceful stop, the
prediction log rows against the request ids answered.

The registry and lake are not touched: the MLflow database is copied into a scratch home
(where the same model is registered once more as the challenger) and the lookup tables into a
scratch lake, which also receives the prediction log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "serving.json"
DATASET = "flights"


# --------------------------------------------------------------------------- the baseline
def bare_app() -> Any:
    """uvicorn --factory benchmarks.serving:bare_app (env: FLYWHEEL_HOME, FLYWHEEL_LAKE_ROOT, ...)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from core.contract import load_contract
    from core.lake import Lake
    from core.registry import CHAMPION, Registry, load_version
    from core.settings import get_settings
    from serving.features import Lookups, inputs

    settings = get_settings()
    contract = load_contract(settings.serving.dataset)
    name = settings.serving.model_name or settings.train.model_name.format(dataset=contract.name)
    registry = Registry.for_uri(settings.tracking_uri)
    version = registry.version_by_alias(name, CHAMPION)
    model = load_version(registry, name, version)
    lookups = Lookups(Lake(settings.lake), contract)
    lookups.refresh()

    def score(records: list[dict[str, Any]]) -> list[float]:
        categorical, numeric, _ = inputs(records, lookups.snapshot, contract, model.stats)
        return [float(s) for s in model.model.predict(categorical, numeric)]  # any family, as the service

    async def predict_route(request: Request) -> JSONResponse:
        body = await request.json()
        scores = await asyncio.to_thread(score, body["records"])
        return JSONResponse({"predictions": [{"score": s, "model_version": model.version} for s in scores]})

    async def ready(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/predict", predict_route, methods=["POST"]), Route("/readyz", ready)])


# --------------------------------------------------------------------------- load generation
def flight_records(lake: Any, n: int = 2000) -> list[dict[str, Any]]:
    """Real flights from the raw table (the request fields only)."""
    from core.contract import load_contract
    from serving.schema import request_fields, scored_fields

    contract = load_contract(DATASET)
    # The fields the model reads, as the figures were measured (a record may carry the whole source row).
    fields = [f for f in request_fields(contract)
              if f in contract.tables[contract.base_table].columns
              and (f in scored_fields(contract) or f in (contract.tables[contract.base_table].primary_key or []))]
    frame = lake.read_pandas(lake.uri("raw", DATASET, "flights"), columns=fields).dropna().sample(n, random_state=3)
    records = []
    for row in frame.to_dict("records"):
        row = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
        records.append({k: (int(v) if isinstance(v, float) and contract.tables[contract.base_table].columns[k].type
                            == "int" else v) for k, v in row.items()})
    return records


async def drive(url: str, records: list[dict[str, Any]], concurrency: int, seconds: float,
                rate: float | None = None) -> dict[str, Any]:
    """``concurrency`` clients posting one record each, back to back (or at ``rate`` req/s in
    all). Returns throughput, latency percentiles, errors and the request ids answered."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    ids: list[str] = []
    deadline = time.perf_counter() + seconds
    interval = concurrency / rate if rate else 0.0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def client(index: int) -> None:
            rng = random.Random(index)
            next_at = time.perf_counter()
            while time.perf_counter() < deadline:
                body = {"records": [rng.choice(records)], "routing_key": f"k{rng.randrange(10**9)}"}
                started = time.perf_counter()
                try:
                    async with session.post(f"{url}/predict", json=body) as response:
                        payload = await response.read()
                        if response.status != 200:
                            errors[str(response.status)] = errors.get(str(response.status), 0) + 1
                        else:
                            latencies.append(time.perf_counter() - started)
                            for p in json.loads(payload)["predictions"]:
                                if "request_id" in p:
                                    ids.append(p["request_id"])
                except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                if interval:
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"concurrency": concurrency, "seconds": elapsed, "requests": len(latencies),
            "throughput_rps": len(latencies) / elapsed, "p50_ms": pct(0.50) * 1000, "p99_ms": pct(0.99) * 1000,
            "mean_ms": statistics.fmean(ordered) * 1000 if ordered else float("nan"), "errors": errors,
            "request_ids": ids}


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} was not ready after {timeout} s")


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (Linux /proc)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (OSError, StopIteration):
            continue
        stack.extend(int(c) for c in children)
    return total / 1024


def scratch(settings: Any, workdir: Path) -> tuple[Any, str, str]:
    """A copy of the registry (plus the champion registered again as challenger) and a lake
    with the lookup tables: the benchmark writes there, never to the real ones."""
    from core.contract import load_contract
    from core.lake import Lake
    from core.registry import CHALLENGER, CHAMPION, Registry

    contract = load_contract(DATASET)
    name = settings.train.model_name.format(dataset=contract.name)
    source_db = settings.home / "mlflow.db"
    if not source_db.exists():
        raise SystemExit(f"no MLflow database at {source_db}: run `make train` first")
    home = workdir / "home"
    home.mkdir(parents=True)
    shutil.copy(source_db, home / "mlflow.db")
    tracking = f"sqlite:///{home / 'mlflow.db'}"
    registry = Registry.for_uri(tracking, actor="benchmark")
    champion = registry.version_by_alias(name, CHAMPION)
    if champion is None:
        raise SystemExit(f"{name} has no champion: run `make train` first")
    registry.register(name, champion.source, champion.run_id, dict(champion.tags), [CHALLENGER],
                      reason="benchmark: the champion again, as challenger")
    real, lake = Lake(settings.lake), Lake(str(workdir / "lake"))
    for join in contract.joins:
        shutil.copytree(real.uri("raw", contract.name, join.table), lake.uri("raw", contract.name, join.table))
    return settings.model_copy(update={"home": home, "train": settings.train.model_copy(
        update={"tracking_uri": tracking})}), lake.root, name


def start_service(settings: Any, lake: str, name: str, port: int, extra_env: dict[str, str]) -> Any:
    from serving.control import start

    saved = {k: os.environ.get(k) for k in extra_env}
    os.environ.update(extra_env)
    try:
        return start(settings, DATASET, name, lake, "127.0.0.1", port, 0.5, False, None, 300)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_service(settings: Any, served: Any) -> None:
    from serving.control import state_file, stop

    stop(served, state_file(settings, served.model_name))


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="Seconds of load per concurrency level.")
    parser.add_argument("--warmup", type=float, default=3, help="Seconds of load before each server's first level.")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--soak-seconds", type=float, default=300)
    parser.add_argument("--soak-rate", type=float, default=40, help="Requests per second during the soak.")
    parser.add_argument("--only", nargs="+", choices=["bare", "service", "unbatched", "soak"],
                        default=["bare", "service", "unbatched", "soak"])
    parser.add_argument("--output", default=str(RESULTS_PATH))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from core.lake import Lake
    from core.settings import get_settings

    console = Console(width=140)
    settings = get_settings()
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-bench-serving-"))
    results: dict[str, Any] = {"runs": {}}
    try:
        bench_settings, lake_root, name = scratch(settings, workdir)
        records = flight_records(Lake(settings.lake))
        env = {"FLYWHEEL_HOME": str(bench_settings.home), "FLYWHEEL_LAKE_ROOT": lake_root,
               "FLYWHEEL_TRAIN__TRACKING_URI": bench_settings.tracking_uri,
               "FLYWHEEL_SERVING__DATASET": DATASET, "PYTHONPATH": str(REPO_ROOT)}
        for variant in [v for v in ("bare", "service", "unbatched") if v in args.only]:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            process, served = None, None
            if variant == "bare":
                process = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "--factory", "benchmarks.serving:bare_app", "--host", "127.0.0.1",
                     "--port", str(port), "--log-level", "warning", "--no-access-log"],
                    cwd=REPO_ROOT, env={**os.environ, **env}, start_new_session=True)
                wait_ready(url, process)
            else:
                served = start_service(bench_settings, lake_root, name, port,
                                       {**env, "FLYWHEEL_SERVING__MAX_BATCH_SIZE": "1"} if variant == "unbatched"
                                       else env)
            console.print(f"[bold]{variant}[/] at {url}")
            try:
                asyncio.run(drive(url, records, 8, args.warmup))
                levels = []
                for concurrency in args.levels:
                    run = asyncio.run(drive(url, records, concurrency, args.seconds))
                    run.pop("request_ids")
                    console.print(f"  c={concurrency}: {run['throughput_rps']:.0f} req/s, p50 {run['p50_ms']:.1f} ms, "
                                  f"p99 {run['p99_ms']:.1f} ms, errors {run['errors']}")
                    levels.append(run)
                results["runs"][variant] = levels
            finally:
                if process is not None:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=30)
                if served is not None:
                    stop_service(bench_settings, served)
        if "soak" in args.only:
            port = free_port()
            served = start_service(bench_settings, lake_root, name, port, env)
            url = f"http://127.0.0.1:{port}"
            asyncio.run(drive(url, records, 8, args.warmup))
            rss_start = tree_rss_mb(served.pid)
            console.print(f"[bold]soak[/] {args.soak_seconds:.0f} s at {args.soak_rate:.0f} req/s "
                          f"(service RSS {rss_start:.0f} MB at start)")
            soak = asyncio.run(drive(url, records, 16, args.soak_seconds, rate=args.soak_rate))
            rss_end = tree_rss_mb(served.pid)
            stop_service(bench_settings, served)
            lake = Lake(lake_root)
            logged = lake.read_pandas(lake.uri("serving", DATASET, "predictions"), columns=["request_id", "served"])
            logged_ids = set(logged[logged["served"]]["request_id"])
            answered = soak.pop("request_ids")
            missing = len(set(answered) - logged_ids)
            results["soak"] = {**soak, "rss_start_mb": rss_start, "rss_end_mb": rss_end,
                               "rss_growth": rss_end / rss_start - 1, "answered": len(answered),
                               "log_rows_missing": missing, "goal_met": rss_end / rss_start - 1 < 0.10
                               and not soak["errors"] and missing == 0}
            console.print(f"  soak: {soak['requests']} requests, errors {soak['errors']}, RSS {rss_start:.0f} -> "
                          f"{rss_end:.0f} MB ({(rss_end / rss_start - 1):+.1%}), log rows missing {missing}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    runs = results["runs"]
    table = Table(title="serving: throughput (req/s) and latency, one record per request")
    for column in ("server", *(f"c={c}" for c in args.levels)):
        table.add_column(column, justify="right")
    for variant, levels in runs.items():
        table.add_row(variant, *(f"{r['throughput_rps']:.0f} rps, p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms"
                                 for r in levels))
    console.print(table)
    top = max(args.levels)

    def at(variant: str) -> dict[str, Any] | None:
        return next((r for r in runs.get(variant, []) if r["concurrency"] == top), None)

    ratios: dict[str, Any] = {}
    service, bare, unbatched = at("service"), at("bare"), at("unbatched")
    if service and bare:
        ratios["service_vs_bare_throughput"] = service["throughput_rps"] / bare["throughput_rps"]
        ratios["service_p99_ms"] = service["p99_ms"]
        ratios["service_goal_met"] = ratios["service_vs_bare_throughput"] >= 0.8 and service["p99_ms"] <= 50
    if service and unbatched:
        ratios["batched_vs_unbatched_throughput"] = service["throughput_rps"] / unbatched["throughput_rps"]
        ratios["batching_goal_met"] = ratios["batched_vs_unbatched_throughput"] >= 2.0
    results["ratios_at_top_concurrency"] = {"concurrency": top, **ratios}
    console.print(f"at c={top}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in ratios.items()))
    payload = {"benchmark": "serving", "when": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()},
               "settings": vars(args), **results}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    console.print(f"results: {output}")


if __name__ == "__main__":
    main()
