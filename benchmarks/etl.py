"""The feature ETL side by side: our Dask code, plain pandas and Polars, on replicated flights.

    python -m benchmarks.etl                      # scales x10 and x30 (~3.4M and ~10M rows)
    python -m benchmarks.etl --quick              # scale x1 only, with the output cross-check
    python -m benchmarks.etl --scales 10 --dask-processes --workdir /tmp/bench-lakes

For each scale the parent builds a Delta lake once (not timed): the four raw tables go through
the real gate and writer, then replicas of the accepted flights are appended (~1M rows per
commit, so the table holds several files). Each variant then runs in its own fresh
subprocess (``--variant NAME --lake DIR``) so its peak RSS is its own. The parent prints a
table and writes ``benchmarks/results/etl.json``.

Every variant computes the same thing: read raw flights (every file of the Delta version),
weather, planes and airports; left-join the lookups; derive features and the label; fit the
vocabularies and numeric mean/std on labelled training rows; encode every labelled row; write
the encoded rows as a Delta table (Dask: our feature table in the lake; pandas and Polars:
``deltalake``-written tables beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "etl.json"
DATASET = "flights"
LOOKUP_TABLES = ("weather", "planes", "airports")
ROWS_PER_APPEND = 1_000_000
RESULT_MARKER = "BENCH_RESULT "
VARIANTS = ("pandas", "polars", "dask", "dask-processes")
LAKE_MARKER = "bench-lake.json"


# --------------------------------------------------------------------------- data prep


def build_lake(root: Path, scale: int) -> dict[str, Any]:
    """Raw lake through the real gate and writer, flights replicated ``scale`` times."""
    import pyarrow as pa

    from core.contract import load_contract
    from core.ingest import batch_fingerprint, write_batch
    from core.lake import Lake, arrow_schema, to_arrow
    from core.sources import make_source
    from core.validation import validate

    marker = root / LAKE_MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("scale") == scale:
            return info
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    started = time.perf_counter()
    contract = load_contract(DATASET)
    lake = Lake(str(root))
    accepted = None
    for table in (contract.base_table, *LOOKUP_TABLES):
        spec = contract.tables[table]
        batch = make_source(table, spec).read()
        result = validate(batch, table, spec)
        if result.rejected:
            raise RuntimeError(f"{table}: the gate rejected the source batch: {result.describe_failures()}")
        write_batch(lake, contract, result, "bench", batch_fingerprint(batch))
        if table == contract.base_table:
            accepted = result.accepted
    assert accepted is not None
    # Replicas go in after the gate (the contract caps year and flight, so copies cannot be
    # made distinct); the raw table simply holds each accepted row `scale` times.
    flights_uri = lake.uri("raw", contract.name, contract.base_table)
    replica = to_arrow(accepted, arrow_schema(contract.tables[contract.base_table]))
    per_append = max(1, round(ROWS_PER_APPEND / max(1, replica.num_rows)))
    remaining = scale - 1
    while remaining > 0:
        copies = min(per_append, remaining)
        lake.append(flights_uri, pa.concat_tables([replica] * copies),
                    {"flywheel.source": f"benchmark replica x{copies}"})
        remaining -= copies
    table = lake.table(flights_uri)
    info = {
        "scale": scale,
        "flights_rows": int(table.count()),
        "flights_files": len(table.file_uris()),
        "flights_version": table.version(),
        "prep_seconds": round(time.perf_counter() - started, 1),
    }
    marker.write_text(json.dumps(info))
    return info


def raw_versions(lake: Any, contract: Any) -> dict[str, int]:
    return {t: lake.latest_version(lake.uri("raw", contract.name, t))
            for t in (contract.base_table, *(j.table for j in contract.joins))}


# --------------------------------------------------------------------------- variants


def run_dask(lake: Any, contract: Any, versions: dict[str, int], processes: bool,
             partition_rows: int) -> dict[str, Any]:
    """Our real code: ``build_feature_table`` on a local cluster from ``compute``."""
    import dask.dataframe  # noqa: F401 - imported before the clock starts, like the others
    import distributed  # noqa: F401

    from compute.dask_session import dask_client
    from compute.etl import build_feature_table, file_groups, partition_plan
    from core.settings import DaskSettings

    if processes:
        settings = DaskSettings(processes=True, n_workers=2, threads_per_worker=1,
                                partition_rows=partition_rows)
    else:
        settings = DaskSettings(partition_rows=partition_rows)
    rss_before = _rss_mb()
    started = time.perf_counter()
    with dask_client(settings) as client:
        cluster_ready = time.perf_counter()
        built = build_feature_table(lake, contract, versions, client, partition_rows=partition_rows)
    seconds = time.perf_counter() - started
    flights_uri = lake.uri("raw", contract.name, contract.base_table)
    groups = file_groups(lake, flights_uri, versions[contract.base_table], partition_rows)
    partitions = sum(len(pieces) for _, pieces in partition_plan(groups, partition_rows))
    return {
        "seconds": seconds,
        "rss_before_mb": rss_before,
        "cluster_start_s": cluster_ready - started,
        "build_s": built.seconds,
        "rows_out": sum(built.rows_by_split.values()),
        "rows_by_split": built.rows_by_split,
        "dask_partitions": partitions,
        "output": built.feature_uri,
        "output_version": built.feature_version,
    }


def run_pandas(lake: Any, contract: Any, versions: dict[str, int], out_uri: str) -> dict[str, Any]:
    """The same steps in plain pandas, in memory: merges for the joins and the pandas transform
    the compiled one replaced (``derive_pandas``, ``encode_pandas``), as a careful pandas
    script would do them."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from core.features import (
        SPLIT_COLUMN,
        derive_pandas,
        encode_pandas,
        explicit_split,
        fit_stats,
        prepare_lookups,
    )

    rss_before = _rss_mb()
    started = time.perf_counter()
    tables = {t: lake.read_pandas(lake.uri("raw", contract.name, t), v) for t, v in versions.items()}
    base = tables.pop(contract.base_table)
    lookups = prepare_lookups(tables, contract)
    del tables
    # Intermediates are dropped as soon as the next step has them: a careful pandas script.
    joined = base
    for join in contract.joins:
        joined = joined.merge(lookups[join.table], how="left", on=join.left_keys, validate="many_to_one")
    del base
    derived = derive_pandas(joined, contract)
    del joined
    derived = derived[derived[contract.target.name].notna()]
    bounds = explicit_split(contract)
    assert bounds, "the flights contract gives explicit split dates"
    stats = fit_stats(derived, contract, *bounds)
    encoded = encode_pandas(derived, contract, stats)
    del derived
    write_deltalake(out_uri, pa.Table.from_pandas(encoded, preserve_index=False), mode="overwrite")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "rss_before_mb": rss_before,
        "rows_out": len(encoded),
        "rows_by_split": {k: int(v) for k, v in encoded[SPLIT_COLUMN].value_counts().items()},
        "output": out_uri,
    }


def polars_features(lake: Any, contract: Any, versions: dict[str, int]) -> Any:
    """The feature transform written natively in Polars (same semantics as core.features)."""
    import polars as pl

    from core.features import SPLIT_COLUMN, explicit_split

    def scan(table: str) -> pl.LazyFrame:
        return pl.scan_delta(lake.uri("raw", contract.name, table), version=versions[table])

    frame = scan(contract.base_table)
    for join in contract.joins:
        keep = contract.join_columns(join)
        lookup = (scan(join.table)
                  .select([*join.right_keys, *keep])
                  .unique(subset=join.right_keys, keep="last", maintain_order=True)
                  .rename({c: f"{c}{join.suffix}" for c in keep}
                          | dict(zip(join.right_keys, join.left_keys, strict=True))))
        frame = frame.join(lookup, on=join.left_keys, how="left", validate="m:1")
    derived_exprs = []
    for spec in contract.derived:
        if spec.op == "concat":
            derived_exprs.append(pl.concat_str([pl.col(c).cast(pl.String) for c in spec.columns],
                                               separator=spec.sep).alias(spec.name))
        elif spec.op == "expr":
            derived_exprs.append(pl.sql_expr(spec.expr).cast(pl.Float64).alias(spec.name))
        else:
            times = pl.col(spec.column).dt.convert_time_zone(spec.timezone or "UTC")
            part = {"hour": times.dt.hour(), "weekday": times.dt.weekday() - 1,  # pandas: Monday=0
                    "month": times.dt.month(), "dayofyear": times.dt.ordinal_day()}[spec.op]
            derived_exprs.append(part.cast(pl.Int64).alias(spec.name))
    target = contract.target
    values = pl.col(target.column).cast(pl.Float64).fill_nan(None)
    if target.kind == "binary":
        label = pl.when(values.is_null()).then(None).otherwise((values > target.threshold).cast(pl.Float64))
    else:
        label = values
    cats, nums = contract.features.categorical, contract.features.numeric
    time_col = contract.time_column
    derived = (frame.with_columns(derived_exprs)
               .with_columns(label.alias(target.name))
               .filter(pl.col(target.name).is_not_null())
               # Categoricals as strings, as category_strings gives them: integers print plainly.
               .with_columns([pl.col(c).cast(pl.String) for c in cats])
               .with_columns([pl.col(c).cast(pl.Float64).fill_nan(None) for c in nums])
               .select([pl.col(time_col).dt.convert_time_zone("UTC"), target.name, *cats, *nums])
               .collect())

    bounds = explicit_split(contract)
    assert bounds, "the flights contract gives explicit split dates"
    train_end, validation_end = (datetime.fromisoformat(b).astimezone(UTC) for b in bounds)
    train = derived.filter(pl.col(time_col) < train_end)
    cap = contract.features.max_categories
    vocabularies = {}
    for c in cats:
        counts = (train.select(pl.col(c).drop_nulls()).group_by(c).len()
                  .sort(["len", c], descending=[True, False]).head(cap))
        vocabularies[c] = counts[c].to_list()
    moments = train.select([pl.col(c).mean().alias(f"mean:{c}") for c in nums]
                           + [pl.col(c).std(ddof=0).alias(f"std:{c}") for c in nums]).row(0, named=True)

    def finite(value: float | None, default: float, positive: bool = False) -> float:
        if value is None or value != value or abs(value) == float("inf"):
            return default  # empty or constant columns: as core.features._finite_or does
        return float(value) if not positive or value > 0 else default

    stamp = pl.col(time_col)
    encoded = derived.select(
        stamp,
        pl.when(stamp < train_end).then(pl.lit("train"))
        .when(stamp < validation_end).then(pl.lit("validation"))
        .otherwise(pl.lit("test")).alias(SPLIT_COLUMN),
        pl.col(target.name),
        *[pl.col(c).replace_strict(vocabularies[c], list(range(1, len(vocabularies[c]) + 1)),
                                   default=0, return_dtype=pl.Int32).fill_null(0).alias(c)
          for c in cats],
        *[((pl.col(c) - finite(moments[f"mean:{c}"], 0.0)) / finite(moments[f"std:{c}"], 1.0, True))
          .fill_null(0.0).cast(pl.Float32).alias(c) for c in nums],
    )
    return encoded


def run_polars(lake: Any, contract: Any, versions: dict[str, int], out_uri: str) -> dict[str, Any]:
    import polars as pl

    from core.features import SPLIT_COLUMN

    rss_before = _rss_mb()
    started = time.perf_counter()
    encoded = polars_features(lake, contract, versions)
    encoded.write_delta(out_uri, mode="overwrite")
    seconds = time.perf_counter() - started
    counts = encoded.group_by(SPLIT_COLUMN).len().iter_rows()
    return {
        "seconds": seconds,
        "rss_before_mb": rss_before,
        "rows_out": encoded.height,
        "rows_by_split": {k: int(n) for k, n in counts},
        "output": out_uri,
        "polars_threads": pl.thread_pool_size(),
    }


def _high_water_mb() -> float:
    """This process image's peak RSS (VmHWM: per address space, reset by exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def child_main(variant: str, lake_root: str, partition_rows: int) -> None:
    """One variant, once, in this (fresh) process; the result goes to stdout as JSON."""
    import_started = time.perf_counter()
    from core.contract import load_contract
    from core.lake import Lake

    contract = load_contract(DATASET)
    lake = Lake(lake_root)
    versions = raw_versions(lake, contract)
    out_uri = str(Path(lake_root) / "bench-output" / variant)
    if variant in ("dask", "dask-processes"):
        runner = lambda: run_dask(lake, contract, versions, variant == "dask-processes",  # noqa: E731
                                  partition_rows)
    elif variant == "pandas":
        import pandas  # noqa: F401

        runner = lambda: run_pandas(lake, contract, versions, out_uri)  # noqa: E731
    else:
        import polars  # noqa: F401

        runner = lambda: run_polars(lake, contract, versions, out_uri)  # noqa: E731
    import_s = time.perf_counter() - import_started  # (dask imports its modules in run_dask)
    result = runner()
    usage_self = resource.getrusage(resource.RUSAGE_SELF)
    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update({
        "variant": variant,
        "import_s": import_s,
        "hwm_self_mb": _high_water_mb(),
        # Kept for reference only: Linux carries the parent's high-water mark across
        # fork+exec into ru_maxrss, so it reads at least the parent's size at launch.
        "ru_maxrss_self_mb": usage_self.ru_maxrss / 1024,  # Linux: kilobytes
        "ru_maxrss_children_mb": usage_children.ru_maxrss / 1024,
        "raw_versions": versions,
    })
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)


# --------------------------------------------------------------------------- parent


def run_child(variant: str, lake_root: Path, partition_rows: int, timeout_s: float) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; sample its process tree's RSS meanwhile."""
    import psutil

    command = [sys.executable, "-m", "benchmarks.etl", "--variant", variant,
               "--lake", str(lake_root), "--partition-rows", str(partition_rows)]
    env = dict(os.environ, GX_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(process.pid)
    tree_peak = 0
    while process.poll() is None:
        try:
            members = [watched, *watched.children(recursive=True)]
            tree_peak = max(tree_peak, sum(_rss_or_zero(p) for p in members))
        except psutil.NoSuchProcess:
            pass
        if time.perf_counter() - started > timeout_s:
            process.kill()
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if process.returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"variant {variant} failed (exit {process.returncode}):\n{tail}")
    result = json.loads(lines[-1].removeprefix(RESULT_MARKER))
    result["process_wall_s"] = time.perf_counter() - started
    result["tree_peak_sampled_mb"] = tree_peak / 2**20
    # Threads: the process's own high-water mark is exact. Worker processes: the sampled
    # sum over the process tree (sampling every 50 ms can miss a short spike).
    result["peak_rss_mb"] = max(result["hwm_self_mb"], result["tree_peak_sampled_mb"])
    return result


def _rss_or_zero(process: Any) -> int:
    import psutil

    try:
        return process.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def compare_outputs(outputs: dict[str, str], reference: str = "pandas") -> list[dict[str, Any]]:
    """Aggregate checks of each variant's feature table against the reference's."""
    from deltalake import DeltaTable

    from core.contract import load_contract
    from core.features import SPLIT_COLUMN

    contract = load_contract(DATASET)
    frames = {name: DeltaTable(uri).to_pyarrow_table().to_pandas() for name, uri in outputs.items()}
    ref = frames[reference]
    label = contract.target.name
    rows = []
    for name, frame in frames.items():
        if name == reference:
            continue

        def check(what: str, ok: bool, detail: str) -> None:
            rows.append({"variant": name, "check": what, "ok": bool(ok), "detail": detail})  # noqa: B023

        check("row count", len(frame) == len(ref), f"{len(frame):,} vs {len(ref):,}")
        check("label mean", abs(frame[label].mean() - ref[label].mean()) < 1e-9,
              f"{frame[label].mean():.6f} vs {ref[label].mean():.6f}")
        same = frame[SPLIT_COLUMN].value_counts().to_dict() == ref[SPLIT_COLUMN].value_counts().to_dict()
        check("rows per split", same, str(frame[SPLIT_COLUMN].value_counts().to_dict()))
        differing = [c for c in contract.features.categorical
                     if frame[c].value_counts().to_dict() != ref[c].value_counts().to_dict()]
        check(f"code counts, all {len(contract.features.categorical)} categoricals", not differing,
              f"differ: {differing}" if differing else "identical (e.g. carrier, route, weekday)")
        gaps = {c: abs(float(frame[c].astype('float64').mean()) - float(ref[c].astype('float64').mean()))
                for c in contract.features.numeric}
        worst = max(gaps, key=gaps.__getitem__)
        check(f"numeric means, all {len(gaps)} within 1e-4", gaps[worst] < 1e-4,
              f"largest gap {gaps[worst]:.2e} ({worst})")
    return rows


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    import psutil

    versions: dict[str, str | None] = {}
    for package in ("pandas", "polars", "dask", "distributed", "deltalake", "pyarrow", "numpy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def summarize(results: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, shutil.get_terminal_size().columns))
    table = Table(title="Feature ETL: Dask (our code) vs pandas vs Polars")
    for column in ("scale", "flights", "variant", "seconds", "dask/this", "peak RSS MB",
                   "RSS at start MB", "rows out"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    notes = []
    for scale in sorted({r["scale"] for r in results}):
        at = {r["variant"]: r for r in results if r["scale"] == scale}
        dask = at.get("dask")
        for variant, r in at.items():
            ratio = f"{dask['seconds'] / r['seconds']:.2f}" if dask and variant != "dask" else ""
            if variant.startswith("dask"):
                notes.append(f"x{scale} {variant}: cluster start {r['cluster_start_s']:.1f}s, "
                             f"{r['dask_partitions']} partition(s) of the raw flights")
            table.add_row(f"x{scale}", f"{r['flights_rows'] / 1e6:.2f}M", variant, f"{r['seconds']:.1f}",
                          ratio, f"{r['peak_rss_mb']:,.0f}", f"{r['rss_before_mb']:,.0f}",
                          f"{r['rows_out']:,}")
    console.print(table)
    for note in notes:
        console.print(note)
    for scale in sorted({r["scale"] for r in results}):
        at = {r["variant"]: r for r in results if r["scale"] == scale}
        if not {"dask", "pandas", "polars"} <= at.keys():
            continue
        d, p, q = at["dask"], at["pandas"], at["polars"]
        goals = [
            ("Dask no slower than pandas", d["seconds"] <= p["seconds"],
             f"dask/pandas = {d['seconds'] / p['seconds']:.2f}"),
            ("Dask within 2x of Polars", d["seconds"] <= 2 * q["seconds"],
             f"dask/polars = {d['seconds'] / q['seconds']:.2f}"),
            ("Dask peak RSS below pandas'", d["peak_rss_mb"] < p["peak_rss_mb"],
             f"{d['peak_rss_mb']:,.0f} vs {p['peak_rss_mb']:,.0f} MB"),
        ]
        for goal, ok, detail in goals:
            mark = "[green]met[/]" if ok else "[red]missed[/]"
            console.print(f"x{scale}: {goal}: {mark} ({detail})")


def parent_main(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, shutil.get_terminal_size().columns))
    scales = [1] if args.quick else args.scales
    variants = list(args.variants)
    if args.dask_processes and "dask-processes" not in variants:
        variants.append("dask-processes")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="flywheel-bench-etl-"))
    payload: dict[str, Any] = {
        "benchmark": "etl",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "scales": scales,
        "variants": variants,
        "repeats": args.repeats,
        "partition_rows": args.partition_rows,
        "machine": machine(),
        "lakes": {},
        "results": [],
        "checks": [],
    }
    results: list[dict[str, Any]] = []
    try:
        for scale in scales:
            lake_root = workdir / f"lake-x{scale}"
            console.print(f"[bold]x{scale}[/]: preparing the lake at {lake_root} (not timed) ...")
            info = build_lake(lake_root, scale)
            payload["lakes"][str(scale)] = info
            console.print(f"  raw flights: {info['flights_rows']:,} rows in {info['flights_files']} files")
            for variant in variants:
                runs = []
                for attempt in range(args.repeats):
                    console.print(f"  {variant} (run {attempt + 1}/{args.repeats}) ...")
                    runs.append(run_child(variant, lake_root, args.partition_rows, args.timeout))
                best = min(runs, key=lambda r: r["seconds"])
                best.update({"scale": scale, "flights_rows": info["flights_rows"],
                             "all_seconds": [round(r["seconds"], 2) for r in runs],
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)})
                results.append(best)
                console.print(f"    {best['seconds']:.1f}s, peak RSS {best['peak_rss_mb']:,.0f} MB")
            if scale == 1 or args.check:
                outputs = {r["variant"]: r["output"] for r in results if r["scale"] == scale}
                if "pandas" in outputs:
                    checks = compare_outputs(outputs)
                    payload["checks"] += [dict(c, scale=scale) for c in checks]
                    table = Table(title=f"x{scale}: outputs against pandas")
                    for column in ("variant", "check", "result", "detail"):
                        table.add_column(column)
                    for c in checks:
                        table.add_row(c["variant"], c["check"], "[green]ok[/]" if c["ok"] else "[red]DIFFERS[/]",
                                      c["detail"])
                    console.print(table)
        payload["results"] = results
        summarize(results)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    write_json(Path(args.output), payload)
    console.print(f"results: {args.output}")
    if any(not c["ok"] for c in payload["checks"]):
        raise SystemExit("outputs differ between variants: see the check table")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.etl", description=__doc__.split("\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[10, 30],
                        help="Flights replication factors (x10 ~3.4M rows, x30 ~10M).")
    parser.add_argument("--quick", action="store_true", help="Scale 1 only, with the output check.")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["pandas", "polars", "dask"],
                        help="Variants to run, in this order.")
    parser.add_argument("--dask-processes", action="store_true",
                        help="Also run Dask on a 2-process LocalCluster (1 thread each).")
    parser.add_argument("--partition-rows", type=int, default=500_000, help="Dask partition_rows.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Fresh processes per variant; the fastest is reported, peak RSS is the max.")
    parser.add_argument("--check", action="store_true",
                        help="Cross-check outputs at every scale (always done at scale 1).")
    parser.add_argument("--workdir", default=None,
                        help="Keep lakes here and reuse them across runs (default: a temp dir, removed).")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds allowed per variant run.")
    parser.add_argument("--output", default=str(RESULTS_PATH), help="Where the JSON results go.")
    # Child mode (used by the parent): one variant in this process.
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        if not args.lake:
            parser.error("--variant needs --lake")
        child_main(args.variant, args.lake, args.partition_rows)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
