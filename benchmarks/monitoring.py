"""Drift on 1,000,000 live rows x 20 features: the monitor's drift step vs plain numpy.

    python -m benchmarks.monitoring                  # 1M x 20, with Evidently on all rows too
    python -m benchmarks.monitoring --rows 200000 --skip-full-evidently

Sides, on the same synthetic data in the model's input space (10 numeric columns and 10
categorical ones as integer codes; the live side has 6 of them moved, 30% of the columns, so
the right decision is "drift"):
- **numpy baseline**: a plain vectorized PSI per column (``np.histogram`` on the reference's
  quantile edges, ``np.bincount`` shares of the codes), written here independently.
- **monitor, psi**: ``monitoring.drift.detect_drift(method="psi")``, the monitor's default.
- **monitor, evidently**: ``detect_drift(method="evidently")`` on ``--sample`` rows per side,
  the scorer behind the HTML report.
- **Evidently, all rows** (unless ``--skip-full-evidently``): the same on every row, to show
  what sampling saves and that it keeps the decision.

Every side's decision and drifted columns are printed next to its time; the ratio that counts
is the monitor's drift step over the numpy baseline (goal <= 5x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "monitoring.json"
MOVED = ["n0", "n1", "n2", "c0", "c1", "c2"]


def make(rows: int, moved: bool, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {}
    for i in range(10):
        shift = 1.0 if moved and f"n{i}" in MOVED else 0.0
        data[f"n{i}"] = rng.normal(shift, 1.0 + i / 10, rows)
    for i in range(10):
        weights = np.linspace(1, 3, 12)
        if moved and f"c{i}" in MOVED:
            weights = weights[::-1]
        data[f"c{i}"] = rng.choice(12, rows, p=weights / weights.sum())
    return pd.DataFrame(data)


def numpy_psi(reference: pd.DataFrame, current: pd.DataFrame, numeric: list[str], categorical: list[str],
              bins: int = 10, floor: float = 1e-4) -> dict[str, float]:
    """The baseline: PSI per column with plain numpy."""
    out = {}
    for column in numeric:
        ref, cur = reference[column].to_numpy(), current[column].to_numpy()
        edges = np.quantile(ref, np.linspace(0, 1, bins + 1))
        edges[0], edges[-1] = -np.inf, np.inf
        r = np.histogram(ref, edges)[0] / len(ref)
        c = np.histogram(cur, edges)[0] / len(cur)
        r, c = np.maximum(r, floor), np.maximum(c, floor)
        out[column] = float(np.sum((c - r) * np.log(c / r)))
    for column in categorical:
        ref, cur = reference[column].to_numpy(), current[column].to_numpy()
        size = int(max(ref.max(), cur.max())) + 1
        r = np.maximum(np.bincount(ref, minlength=size) / len(ref), floor)
        c = np.maximum(np.bincount(cur, minlength=size) / len(cur), floor)
        out[column] = float(np.sum((c - r) * np.log(c / r)))
    return out


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitoring", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Rows on each side.")
    parser.add_argument("--sample", type=int, default=50_000, help="Evidently: rows per side (monitor.sample_rows).")
    parser.add_argument("--repeats", type=int, default=3, help="Best of this many for the fast sides.")
    parser.add_argument("--skip-full-evidently", action="store_true")
    parser.add_argument("--output", default=str(RESULTS_PATH))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from monitoring.drift import DriftThresholds, detect_drift

    console = Console(width=130)
    numeric, categorical = [f"n{i}" for i in range(10)], [f"c{i}" for i in range(10)]
    reference, current = make(args.rows, False, 1), make(args.rows, True, 2)
    console.print(f"{args.rows:,} rows x 20 columns per side; moved: {MOVED}")
    thresholds = DriftThresholds(sample_rows=args.sample)
    import evidently  # noqa: F401 - its import (~10 s) is not part of a drift step

    rows: list[dict[str, Any]] = []

    def best(name: str, fn: Any, decide: Any) -> dict[str, Any]:
        runs = [timed(fn) for _ in range(args.repeats)]
        result, seconds = min(runs, key=lambda r: r[1])
        drift, drifted = decide(result)
        row = {"side": name, "seconds": seconds, "all_seconds": [round(r[1], 3) for r in runs],
               "drift": drift, "drifted": sorted(drifted)}
        rows.append(row)
        console.print(f"  {name}: {seconds:.2f} s, drift {drift}, drifted {sorted(drifted)}")
        return row

    base = best("numpy PSI baseline", lambda: numpy_psi(reference, current, numeric, categorical),
                lambda scores: (sum(v >= 0.2 for v in scores.values()) / 20 >= 0.3,
                                [c for c, v in scores.items() if v >= 0.2]))
    psi_side = best("monitor: detect_drift(psi)", lambda: detect_drift(reference, current, categorical, numeric,
                                                                        thresholds, method="psi"),
                    lambda r: (r.drift, r.drifted))
    ev_side = best(f"monitor: detect_drift(evidently, {args.sample:,} rows)",
                   lambda: detect_drift(reference, current, categorical, numeric, thresholds, method="evidently"),
                   lambda r: (r.drift, r.drifted))
    if not args.skip_full_evidently:
        saved, args.repeats = args.repeats, 1
        best("Evidently on all rows", lambda: detect_drift(reference, current, categorical, numeric,
                                                           DriftThresholds(sample_rows=10**12), method="evidently"),
             lambda r: (r.drift, r.drifted))
        args.repeats = saved

    table = Table(title=f"drift on {args.rows:,} x 20 (best of {args.repeats})")
    for column in ("side", "seconds", "x numpy", "drift", "drifted columns"):
        table.add_column(column)
    for row in rows:
        row["ratio_vs_numpy"] = row["seconds"] / base["seconds"]
        table.add_row(row["side"], f"{row['seconds']:.2f}", f"{row['ratio_vs_numpy']:.1f}",
                      str(row["drift"]), ", ".join(row["drifted"]))
    console.print(table)
    same = all(r["drift"] == base["drift"] and r["drifted"] == base["drifted"] for r in rows)
    console.print(f"monitor drift step (psi) / numpy: {psi_side['ratio_vs_numpy']:.2f} (goal <= 5: "
                  f"{'met' if psi_side['ratio_vs_numpy'] <= 5 else 'missed'}); Evidently on a sample / numpy: "
                  f"{ev_side['ratio_vs_numpy']:.1f}; every side's decision the same: {same}")
    payload = {"benchmark": "monitoring", "when": datetime.now(UTC).isoformat(timespec="seconds"),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "settings": vars(args), "rows": rows, "same_decision": same}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    console.print(f"results: {output}")


if __name__ == "__main__":
    main()
