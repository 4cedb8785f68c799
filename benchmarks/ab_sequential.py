"""The A/B decision looked at again and again: the sequential test (``core.ab.decide``'s
default) against the fixed 95% bootstrap interval it replaced, side by side on the same
simulated traffic.

    python -m benchmarks.ab_sequential                     # 500 A/A repetitions, 10,000 labelled rows each
    python -m benchmarks.ab_sequential --repetitions 50 --bootstrap-repetitions 20   # a quicker look

**A/A** (the same model in both arms): each repetition draws 10,000 labelled predictions, routed
to the challenger with ``--share``; the evaluate deployment looks after every ``--look-every``
labelled rows (100 looks, more often than the demo's every-minute deployment) and acts on the
first decision. Any promote or drop is wrong. Both tests see the same rows at the same looks
(the bootstrap, being slow, on the first ``--bootstrap-repetitions`` of them).

**A better challenger** (ROC AUC ``--auc`` + ``--lift``): how many labelled rows the sequential
test needs before it promotes (and how often it never does within the rows, or drops).

The rows: a 20% positive rate, scores ``sigmoid(N(Δ·label, 1))`` with Δ set for the arm's AUC
(``Δ = √2 Φ⁻¹(AUC)``), like the flights champion's 0.70. Decisions come from the public
``core.ab.decide``; nothing of it is copied here. The bootstrap uses ``--resamples`` (200 by
default; 1,000 in the flow) to keep the run within minutes: a percentile interval from fewer
resamples is a little noisier, not wider. Results go to ``benchmarks/results/ab_sequential.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import save_results

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "ab_sequential.json"


def traffic(rng: np.random.Generator, rows: int, auc: float, positive_rate: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Labels and the scores of a model with the given ROC AUC (binormal, equal variances)."""
    from scipy.stats import norm

    separation = np.sqrt(2) * norm.ppf(auc)
    labels = (rng.random(rows) < positive_rate).astype(float)
    scores = 1 / (1 + np.exp(-(separation * labels + rng.normal(size=rows))))
    return labels, scores


def first_decision(seed: int, rows: int, share: float, look_every: int, champion_auc: float, challenger_auc: float,
                   min_rows: int, test: str, resamples: int) -> dict[str, Any]:
    """Look after every ``look_every`` labelled rows; the first promote or drop ends the test."""
    from core.ab import Arm, decide

    rng = np.random.default_rng(seed)
    to_challenger = rng.random(rows) < share
    champion_labels, champion_scores = traffic(rng, rows, champion_auc)
    challenger_labels, challenger_scores = traffic(rng, rows, challenger_auc)
    looks = 0
    for seen in range(look_every, rows + 1, look_every):
        arms = to_challenger[:seen]
        champion_rows, challenger_rows = np.flatnonzero(~arms), np.flatnonzero(arms)
        if len(champion_rows) < min_rows or len(challenger_rows) < min_rows:
            continue
        looks += 1
        decision = decide("classification",
                          Arm("champion", "1", champion_labels[champion_rows], champion_scores[champion_rows]),
                          Arm("challenger", "2", challenger_labels[challenger_rows], challenger_scores[challenger_rows]),
                          min_rows, test=test, resamples=resamples, seed=seed * 1000 + looks, looks=looks)  # type: ignore[arg-type]
        if decision.action in ("promote", "drop"):
            return {"action": decision.action, "rows": seen, "looks": looks}
    return {"action": "keep", "rows": rows, "looks": looks}


def _run(job: tuple) -> dict[str, Any]:
    return first_decision(*job)


def campaign(name: str, test: str, repetitions: int, rows: int, share: float, look_every: int, champion_auc: float,
             challenger_auc: float, min_rows: int, resamples: int, workers: int) -> dict[str, Any]:
    jobs = [(seed, rows, share, look_every, champion_auc, challenger_auc, min_rows, test, resamples)
            for seed in range(repetitions)]
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        outcomes = list(pool.map(_run, jobs, chunksize=max(1, repetitions // (workers * 8))))
    actions = [o["action"] for o in outcomes]
    decided = [o["rows"] for o in outcomes if o["action"] == "promote"]
    result = {"name": name, "test": test, "repetitions": repetitions, "rows": rows, "share": share,
              "look_every": look_every, "looks_max": max(o["looks"] for o in outcomes), "champion_auc": champion_auc,
              "challenger_auc": challenger_auc, "min_rows": min_rows,
              "resamples": resamples if test == "bootstrap" else None,
              "promote": actions.count("promote") / repetitions, "drop": actions.count("drop") / repetitions,
              "keep": actions.count("keep") / repetitions,
              "rows_to_promote_median": float(np.median(decided)) if decided else None,
              "rows_to_promote_p90": float(np.percentile(decided, 90)) if decided else None,
              "seconds": round(time.perf_counter() - started, 1)}
    wrong = result["promote"] + result["drop"] if champion_auc == challenger_auc else result["drop"]
    result["wrong"] = wrong
    print(f"{name:>8} {test:>10}: promote {result['promote']:.1%} drop {result['drop']:.1%} keep {result['keep']:.1%}"
          f" (wrong {wrong:.1%}); median rows to promote {result['rows_to_promote_median']}; "
          f"{result['seconds']} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=500)
    parser.add_argument("--rows", type=int, default=10_000, help="labelled rows per repetition (both arms)")
    parser.add_argument("--share", type=float, default=0.5, help="the challenger's share of the traffic")
    parser.add_argument("--look-every", type=int, default=100, help="labelled rows between two looks")
    parser.add_argument("--auc", type=float, default=0.70, help="the champion's ROC AUC")
    parser.add_argument("--lift", type=float, default=0.03, help="the better challenger's ROC AUC over the champion's")
    parser.add_argument("--better-rows", type=int, default=40_000, help="labelled rows for the better challenger")
    parser.add_argument("--better-repetitions", type=int, default=100)
    parser.add_argument("--bootstrap-repetitions", type=int, default=200,
                        help="A/A repetitions of the (slow) bootstrap; the sequential test runs --repetitions")
    parser.add_argument("--min-rows", type=int, default=300)
    parser.add_argument("--resamples", type=int, default=200, help="the bootstrap's resamples")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    common = {"share": args.share, "look_every": args.look_every, "min_rows": args.min_rows,
              "resamples": args.resamples, "workers": args.workers}
    runs = []
    for test, repetitions in (("sequential", args.repetitions), ("bootstrap", args.bootstrap_repetitions)):
        runs.append(campaign("A/A", test, repetitions, args.rows, champion_auc=args.auc,
                             challenger_auc=args.auc, **common))
    runs.append(campaign("better", "sequential", args.better_repetitions, args.better_rows, champion_auc=args.auc,
                         challenger_auc=args.auc + args.lift, **common))
    return save_results(RESULTS_PATH, runs)


if __name__ == "__main__":
    main()
