"""Thompson-sampling allocation (``serving.allocation: thompson``) against a fixed 50/50 split,
on simulated traffic with known reward rates.

    python -m benchmarks.bandit                      # 0.60 vs 0.70, 200 seeds, 5,000 labelled rows each
    python -m benchmarks.bandit --seeds 20

Each labelled row is a request with a random routing key, routed by the service's own sticky
router (``serving.router.route``) at the current share; its reward is drawn at its arm's rate.
After every ``--update-every`` labelled rows (one evaluate run) the share is set again by
``core.allocation.thompson_share`` from both arms' rewards so far, within the floor and
ceiling. Reported per scenario: the better arm's share of the traffic in the last update
before 2,000 labelled rows, the rows until it first reaches 80%, and the regret (reward lost
against always choosing the better arm) next to the fixed split's. Scenarios: the better arm
as challenger, as champion, and equal rates (neither arm should fall below the floor).
Results go to ``benchmarks/results/bandit.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import save_results

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bandit.json"


def simulate(champion_rate: float, challenger_rate: float, rows: int = 5000, update_every: int = 100,
             floor: float = 0.05, seed: int = 0, thompson: bool = True) -> dict[str, Any]:
    """One run: the challenger's share after each update, the traffic and the regret."""
    from core.allocation import Reward, thompson_share
    from serving.router import route

    rng = np.random.default_rng(seed)
    rates = {"champion": champion_rate, "challenger": challenger_rate}
    best = max(rates.values())
    counts = {arm: [0, 0] for arm in rates}  # successes, trials
    share, shares, to_challenger, regret = 0.5, [], [], 0.0
    for start in range(0, rows, update_every):
        for _ in range(min(update_every, rows - start)):
            variant, _ = route(rng.bytes(8).hex(), share, True)
            reward = rng.random() < rates[variant]
            counts[variant][0] += int(reward)
            counts[variant][1] += 1
            to_challenger.append(variant == "challenger")
            regret += best - rates[variant]
        if thompson:
            share = thompson_share(Reward(*counts["champion"]), Reward(*counts["challenger"]), floor, 1 - floor,
                                   seed=seed * 100_003 + start)
        shares.append(share)
    return {"shares": shares, "to_challenger": np.array(to_challenger), "regret": regret}


def scenario(name: str, champion_rate: float, challenger_rate: float, seeds: int, rows: int, update_every: int,
             floor: float, by_rows: int = 2000, target: float = 0.8) -> dict[str, Any]:
    better_is_challenger = challenger_rate > champion_rate
    reached: list[int | None] = []
    at_2000: list[float] = []
    regrets: list[float] = []
    fixed_regrets: list[float] = []
    lowest: list[float] = []
    for seed in range(seeds):
        run = simulate(champion_rate, challenger_rate, rows, update_every, floor, seed)
        better_share = [s if better_is_challenger else 1 - s for s in run["shares"]]
        updates_by = by_rows // update_every - 1  # the share routing the rows just before by_rows
        at_2000.append(better_share[updates_by])
        first = next((i for i, s in enumerate(better_share) if s >= target), None)
        reached.append(None if first is None else (first + 1) * update_every)
        regrets.append(run["regret"])
        fixed_regrets.append(simulate(champion_rate, challenger_rate, rows, update_every, floor, seed,
                                      thompson=False)["regret"])
        traffic = run["to_challenger"]
        lowest.append(min(traffic.mean(), 1 - traffic.mean()))
    equal = champion_rate == challenger_rate
    within = [r for r in reached if r is not None and r <= by_rows]
    result = {
        "name": name, "champion_rate": champion_rate, "challenger_rate": challenger_rate, "seeds": seeds,
        "rows": rows, "update_every": update_every, "floor": floor,
        "better_share_at_2000_median": None if equal else float(np.median(at_2000)),
        "better_share_at_2000_seed0": None if equal else float(at_2000[0]),
        "reached_80_by_2000": None if equal else len(within) / seeds,
        "rows_to_80_median": None if equal else float(np.median([float(r) for r in reached if r is not None] or [np.nan])),
        "regret_thompson_mean": float(np.mean(regrets)), "regret_fixed_mean": float(np.mean(fixed_regrets)),
        "lowest_traffic_share_min": float(np.min(lowest)),
        "share_min": float(min(min(simulate(champion_rate, challenger_rate, rows, update_every, floor, s)["shares"])
                               for s in range(min(seeds, 20)))),
    }
    print(f"{name:>22}: better arm's share at 2,000 rows median {result['better_share_at_2000_median']}, "
          f"seed 0 {result['better_share_at_2000_seed0']}; reached 80% by 2,000 rows in "
          f"{result['reached_80_by_2000']}; regret {result['regret_thompson_mean']:.1f} vs fixed 50/50 "
          f"{result['regret_fixed_mean']:.1f}; least traffic share {result['lowest_traffic_share_min']:.3f}",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--update-every", type=int, default=100, help="labelled rows between two evaluate runs")
    parser.add_argument("--floor", type=float, default=0.05)
    args = parser.parse_args(argv)
    common = {"seeds": args.seeds, "rows": args.rows, "update_every": args.update_every, "floor": args.floor}
    runs = [scenario("better challenger", 0.60, 0.70, **common),
            scenario("better champion", 0.70, 0.60, **common),
            scenario("equal rates", 0.65, 0.65, **common)]
    return save_results(RESULTS_PATH, runs)


if __name__ == "__main__":
    main()
