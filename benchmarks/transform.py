"""The feature transform: the compiled one (``core.transform``) against the pandas transform it
replaced (``core.features.transform_pandas``), in the same run, on real flights.

    python -m benchmarks.transform                 # 1 and 256 records; 1,000,000-row partitions
    python -m benchmarks.transform --rows 200000   # a smaller partition

Serving's path: validated request records -> lookups joined (weather, planes, airports) ->
derived columns -> codes and standardized numerics, as the service computes them
(``serving.features.inputs``), against the pandas path (``frame_from_records``, the merge of
``join_lookups`` with the request's own values over the lookup's, ``transform_pandas``).
Both must give the same arrays; the time is the median of ``--repeats`` calls after a warm-up.

The ETL's path: one partition of joined flights -> derived columns -> encoded rows
(``core.features.transform``, what each Dask partition runs) against ``transform_pandas``;
best of 3. Results go to ``benchmarks/results/transform.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "transform.json"


def flights() -> tuple[Any, Any, Any, Any]:
    """The contract, the flights base table (typed as the lake holds it), the prepared lookups
    and stats fitted on the training period (all through the library's own functions)."""
    import pandas as pd

    from core.contract import load_contract
    from core.features import (
        as_utc,
        derive_pandas,
        fit_stats,
        join_lookups,
        prepare_lookups,
        split_boundaries,
    )
    from core.sources import make_source
    from core.validation import validate

    contract = load_contract("flights")
    tables = {}
    for table in contract.feature_tables():
        result = validate(make_source(table, contract.tables[table]).read(), table, contract.tables[table])
        frame = result.accepted.reset_index(drop=True)
        for column, spec in contract.tables[table].columns.items():
            if spec.type == "datetime" and column in frame:
                frame[column] = as_utc(frame[column])  # as the lake holds it: UTC
        tables[table] = frame
    lookups = prepare_lookups({j.table: tables[j.table] for j in contract.joins}, contract)
    base = tables[contract.base_table]
    derived = derive_pandas(join_lookups(base, lookups, contract), contract)
    train_end, validation_end = split_boundaries(derived[contract.time_column], contract)
    stats = fit_stats(derived, contract, train_end, validation_end)
    assert isinstance(base, pd.DataFrame)
    return contract, base, lookups, stats


def request_records(contract: Any, base: Any, n: int) -> list[dict[str, Any]]:
    """``n`` flights as the service receives them (validated by its request model)."""
    from serving.schema import record_model, scored_fields

    model = record_model(contract)
    key = contract.tables[contract.base_table].primary_key or []
    fields = [f for f in model.model_fields if f in base.columns and (f in scored_fields(contract) or f in key)]
    records = []
    for row in base.sample(n, random_state=7)[fields].astype(object).to_dict("records"):
        clean = {k: (None if v is None or v != v else v) for k, v in row.items()}
        clean = {k: (v.to_pydatetime() if hasattr(v, "to_pydatetime") else v) for k, v in clean.items()}
        records.append(model.model_validate(clean).model_dump())
    return records


def pandas_inputs(records: list[dict[str, Any]], lookups: Any, contract: Any, stats: Any) -> tuple[Any, Any]:
    """The pandas transform of request records (what the service ran before)."""
    from core.features import frame_from_records, join_lookups, transform_pandas
    from core.transform import Z_LIMIT

    frame = frame_from_records(records, contract)
    joined_names = {f"{c}{j.suffix}" for j in contract.joins for c in contract.join_columns(j)}
    sent = {name: frame.pop(name) for name in list(frame.columns) if name in joined_names}
    joined = join_lookups(frame, lookups, contract)
    for name, values in sent.items():
        joined[name] = values.where(values.notna(), joined[name])
    joined[contract.target.column] = np.nan
    encoded = transform_pandas(joined, contract, stats)
    numeric = np.clip(encoded[contract.features.numeric].to_numpy(np.float64), -Z_LIMIT, Z_LIMIT)
    return encoded[contract.features.categorical].to_numpy(np.int64), numeric.astype(np.float32)


def median_ms(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the ETL partition")
    parser.add_argument("--repeats", type=int, default=200, help="calls per serving measurement")
    args = parser.parse_args()

    import pandas as pd

    from core.features import index_lookups, join_lookups, transform, transform_pandas
    from serving.features import LookupSnapshot, inputs

    contract, base, lookups, stats = flights()
    snapshot = LookupSnapshot(index_lookups(lookups, contract), {})
    rows: list[dict[str, Any]] = []
    for n in (1, 256):
        records = request_records(contract, base, n)
        new = inputs(records, snapshot, contract, stats)
        old = pandas_inputs(records, lookups, contract, stats)
        assert np.array_equal(new[0], old[0]) and np.array_equal(new[1], old[1]), "the two transforms differ"
        compiled_ms = median_ms(lambda records=records: inputs(records, snapshot, contract, stats), args.repeats)
        pandas_ms = median_ms(lambda records=records: pandas_inputs(records, lookups, contract, stats),
                              max(20, args.repeats // 10))
        rows.append({"path": "serving", "records": n, "compiled_ms": round(compiled_ms, 3),
                     "pandas_ms": round(pandas_ms, 3), "speedup": round(pandas_ms / compiled_ms, 1)})

    copies = -(-args.rows // len(base))
    partition = pd.concat([base] * copies, ignore_index=True).iloc[:args.rows]
    joined = join_lookups(partition, lookups, contract)
    best: dict[str, float] = {}
    for name, fn in (("compiled", transform), ("pandas", transform_pandas)):
        for _ in range(3):
            started = time.perf_counter()
            out = fn(joined, contract, stats)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
        del out
    rows.append({"path": "etl partition", "records": len(joined), "compiled_ms": round(best["compiled"] * 1e3, 1),
                 "pandas_ms": round(best["pandas"] * 1e3, 1), "speedup": round(best["pandas"] / best["compiled"], 1)})

    print(f"{'path':<14} {'records':>9} {'compiled ms':>12} {'pandas ms':>10} {'speedup':>8}")
    for row in rows:
        print(f"{row['path']:<14} {row['records']:>9,} {row['compiled_ms']:>12} {row['pandas_ms']:>10} "
              f"{row['speedup']:>7}x")
    RESULTS_PATH.write_text(json.dumps({
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "rows": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }, indent=2) + "\n")
    print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
