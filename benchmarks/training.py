"""Training side by side: Ray Train / Ray Tune / the Prefect train flow vs plain PyTorch.

    python -m benchmarks.training                         # all four sub-benchmarks, full sizes
    python -m benchmarks.training --quick                 # 20k training rows, small budgets
    python -m benchmarks.training --only epoch coldstart  # a selection
    python -m benchmarks.training --only asha --trials 2 --epochs 2 --rows 5000

Sub-benchmarks (``--only``):

- ``epoch``: Ray Train (``compute.train.fit``) per-epoch time vs a plain PyTorch loop doing the
  same work (network, AdamW, BCE, batch size, per-epoch validation and checkpoint write), with
  the same process count: 1 worker (2 torch threads) vs one process (2 threads), and 2 DDP
  workers (1 thread each) vs ``torch.multiprocessing`` DDP over gloo (2 processes, 1 thread).
- ``asha``: Ray Tune ASHA vs random search (FIFO) with the same seed, so the same configs: the
  trial-epochs and wall time until each first reaches the random search's best val_loss.
- ``e2e``: ``python -m flows.train --smoke-test`` (and the default run, not in ``--quick``) on a
  fresh ``--home`` vs a plain pandas + PyTorch script doing the same stages from the sources.
- ``coldstart``: ``python -m flows.train --help`` vs ``python -c "import prefect"``.
- ``families``: the train flow's competition on the flights feature table (the settings'
  families and budget): each family's best validation loss and test metrics, and the winner.
- ``gbdt``: the gbdt family's time per boosting round on Ray Train's ``LightGBMTrainer`` (one
  worker, 2 threads, with its per-block validation and checkpoint) vs plain ``lightgbm.train``
  with the same parameters and threads.

Every measured variant runs in its own fresh interpreter (``--variant NAME``); the parent
prints tables and merges its figures into ``benchmarks/results/training.json`` (sections not
run are kept from earlier runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "training.json"
RESULT_MARKER = "BENCH_RESULT "
DATASET = "flights"
SUBS = ("epoch", "asha", "e2e", "coldstart", "families", "gbdt")
CHILD_VARIANTS = ("epoch-ray", "epoch-plain", "epoch-ddp", "asha", "plain-e2e", "families", "gbdt-ray", "gbdt-plain")
# The loop configuration of the brief (hyperparameters fixed for the epoch benchmark).
EPOCH_HPARAMS = {"lr": 0.005, "width": 128, "depth": 2, "dropout": 0.0, "embedding_dim": 8,
                 "batch_size": 1024, "weight_decay": 1e-5}
SEED = 13
CHECKPOINT_STAMP = re.compile(r"checkpoint_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d+)$")


# --------------------------------------------------------------------------- data


def load_arrays(rows: int | None, version: int | None = None) -> tuple[dict[str, tuple], dict[str, Any], dict[str, Any]]:
    """Train/validation/test arrays, the spec's fixed fields and where they came from.

    The lake's feature table if there is one, else the smoke lake's, else synthetic arrays of
    the contract's shape. ``version``: the feature table version (the parent pins the latest
    at its start, so every child reads the same rows even if a new version lands meanwhile).
    ``rows``: keep every k-th row of every split so that the training
    split has about ``rows`` rows (the same stride as ``load_training_data(sample_every=k)``).
    """
    import numpy as np

    from core.contract import load_contract
    from core.lake import Lake
    from tasks.train import load_training_data

    contract = load_contract(DATASET)
    for root, label in feature_roots():
        lake = Lake(root)
        if lake.exists(lake.uri("features", contract.name)):
            data = load_training_data(lake, contract, version)
            splits = {s: data.splits[s].as_tuple() for s in ("train", "validation", "test")}
            spec = data.spec_base()
            source = {"kind": label, "uri": data.feature_uri, "version": data.feature_version}
            break
    else:
        rng = np.random.default_rng(SEED)
        n_cat, n_num = len(contract.features.categorical), len(contract.features.numeric)
        cards = [251] * n_cat
        sizes = {"train": 220_000, "validation": 50_000, "test": 57_000}
        weights = rng.normal(size=n_num)
        splits = {}
        for s, n in sizes.items():
            cat = rng.integers(0, 251, size=(n, n_cat), dtype=np.int64)
            num = rng.normal(size=(n, n_num)).astype(np.float32)
            logit = num @ weights * 0.5 - 1.2 + (cat[:, 0] % 7 == 0)
            y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
            splits[s] = (cat, num, y)
        spec = {"task": "classification", "categorical": list(contract.features.categorical),
                "numeric": list(contract.features.numeric), "cardinalities": cards,
                "output_bias": float(np.log(0.24 / 0.76))}
        source = {"kind": "synthetic", "uri": None, "version": None}
    full_train = len(splits["train"][2])
    stride = max(1, math.ceil(full_train / rows)) if rows else 1
    if stride > 1:
        # Contiguous copies: what the Ray workers get from the object store, too (strided views
        # made the plain 2-thread loop several times slower).
        splits = {s: tuple(np.ascontiguousarray(a[::stride]) for a in arrays) for s, arrays in splits.items()}
    source.update({"stride": stride, "full_train_rows": full_train,
                   "rows": {s: len(a[2]) for s, a in splits.items()}})
    return splits, spec, source


def feature_roots() -> list[tuple[str, str]]:
    from core.settings import get_settings

    lake = get_settings().lake
    return [(lake, "feature table"), (lake.rstrip("/") + "/_smoke", "smoke feature table")]


def pinned_feature_version() -> int | None:
    """The latest version of the feature table the children will read (None: synthetic)."""
    from core.lake import Lake

    for root, _ in feature_roots():
        lake = Lake(root)
        uri = lake.uri("features", DATASET)
        if lake.exists(uri):
            return lake.latest_version(uri)
    return None


def _now_from_stamp(text: str) -> float:
    """A Ray checkpoint folder's timestamp (local time, made on rank 0 at report) as epoch s."""
    return datetime.strptime(text, "%Y-%m-%d_%H-%M-%S.%f").timestamp()


def checkpoint_times(folder: Path) -> list[float]:
    stamps = []
    for path in folder.rglob("checkpoint_*"):
        match = CHECKPOINT_STAMP.search(path.name)
        if match and path.is_dir():
            stamps.append(_now_from_stamp(match.group(1)))
    return sorted(stamps)


def epoch_summary(call: float, stamps: list[float], done: float, epochs: int) -> dict[str, Any]:
    """Per-epoch times from per-epoch timestamps; the fixed part is wall minus E x steady epoch."""
    diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    steady = statistics.median(diffs) if diffs else float("nan")
    wall = done - call
    return {
        "wall_s": wall,
        "epoch_stamps_rel_s": [round(t - call, 3) for t in stamps],
        "epochs_2_to_E_s": [round(d, 3) for d in diffs],
        "per_epoch_median_s": steady,
        "per_epoch_mean_s": statistics.fmean(diffs) if diffs else float("nan"),
        "first_epoch_incl_start_s": (stamps[0] - call) if stamps else float("nan"),
        "after_last_epoch_s": (done - stamps[-1]) if stamps else float("nan"),
        # Start-up (and teardown): wall minus E steady epochs.
        "fixed_s": wall - epochs * steady if diffs else float("nan"),
        "epochs_seen": len(stamps),
    }


# --------------------------------------------------------------------------- epoch: plain loops


def loop_config(spec: dict, epochs: int, threads: int, workers: int) -> Any:
    """The ``LoopConfig`` both the Ray and the plain variants run (no failures allowed)."""
    from core.training import LoopConfig, TrainingConfig

    training = TrainingConfig(trials=1, max_epochs=epochs, num_workers=workers, max_failures=0, seed=SEED)
    return LoopConfig(training=training, data_spec=spec, epochs=epochs, threads_per_worker=threads)


def _plain_epochs(splits: dict, spec: dict, epochs: int, threads: int, rank: int, world: int,
                  folder: Path, barrier: Any = None, wrap: Any = None) -> tuple[list[float], list[dict]]:
    """The real epoch loop (``core.families.tabular_net.fit_epochs``) without Ray: a plain
    session whose report records a timestamp (after a barrier under DDP, as ``ray.train.report``
    is one) and whose checkpoints are copied into ``folder`` (as Ray persists each reported
    checkpoint)."""
    import torch

    from core.families import FitData
    from core.families.tabular_net import fit_epochs

    stamps: list[float] = []
    history: list[dict] = []

    class PlainSession:
        device = torch.device("cpu")

        def __init__(self, threads: int) -> None:
            self.rank, self.world, self.iterations, self.threads, self.seed = rank, world, epochs, threads, SEED
            self.prepare_model = wrap or (lambda m: m)

        def report(self, metrics: dict, folder: Path | None) -> None:
            if folder is not None:
                shutil.copytree(folder, checkpoints / f"checkpoint_{len(stamps):06d}")
            if barrier is not None:
                barrier()
            stamps.append(time.time())
            history.append({k: v for k, v in metrics.items() if k != "startup_s"})

        def resume_from(self) -> None:
            return None

        def before_iteration(self, iteration: int) -> None:
            return None

    checkpoints = folder
    data = FitData(spec, splits["train"], splits["validation"])
    fit_epochs(data, EPOCH_HPARAMS, PlainSession(threads), time.perf_counter())
    return stamps, history


def run_epoch_plain(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    splits, spec, source = load_arrays(args.rows, args.feature_version)
    folder = Path(tempfile.mkdtemp(prefix="flywheel-bench-plain-"))
    try:
        call = time.time()
        stamps, history = _plain_epochs(splits, spec, args.epochs, args.threads, 0, 1, folder)
        done = time.time()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {**epoch_summary(call, stamps, done, args.epochs), "history": history, "data": source,
            "threads": torch.get_num_threads(), "processes": 1}


def _ddp_worker(rank: int, world: int, port: int, splits: dict, spec: dict, epochs: int,
                folder: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stamps, history = _plain_epochs(splits, spec, epochs, 1, rank, world, Path(folder), dist.barrier,
                                        torch.nn.parallel.DistributedDataParallel)
        if rank == 0:
            Path(out).write_text(json.dumps({"stamps": stamps, "history": history}))
    finally:
        dist.destroy_process_group()


def run_epoch_ddp(args: argparse.Namespace) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    splits, spec, source = load_arrays(args.rows, args.feature_version)
    folder = Path(tempfile.mkdtemp(prefix="flywheel-bench-ddp-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = folder / "result.json"
    try:
        call = time.time()  # includes spawning the 2 processes and the gloo rendezvous
        mp.spawn(_ddp_worker, args=(args.workers, port, splits, spec, args.epochs, str(folder), str(out)),
                 nprocs=args.workers, join=True)
        done = time.time()
        result = json.loads(out.read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {**epoch_summary(call, result["stamps"], done, args.epochs), "history": result["history"],
            "data": source, "threads": 1, "processes": args.workers}


def run_epoch_ray(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from compute.ray_session import ray_session
    from compute.train import fit
    from core.settings import RaySettings

    splits, spec, source = load_arrays(args.rows, args.feature_version)
    storage = Path(tempfile.mkdtemp(prefix="flywheel-bench-ray-"))
    try:
        started = time.time()
        with ray_session(RaySettings(num_cpus=2)):
            ray_ready = time.time()
            data_ref = ray.put({"train": splits["train"], "validation": splits["validation"]})
            loop = loop_config(spec, args.epochs, args.threads, args.workers)
            call = time.time()
            result = fit(loop, "tabular_net", EPOCH_HPARAMS, data_ref, str(storage), "epoch-bench")
            done = time.time()
        stamps = checkpoint_times(storage)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    history = [{k: v for k, v in row.items() if k in ("epoch", "train_loss", "val_loss", "val_auc", "time_total_s")}
               for row in result.history]
    has_time_total = any("time_total_s" in row for row in result.history)
    if has_time_total:  # what the brief expected; Train V2's fit history does not have it
        totals = [row["time_total_s"] for row in result.history]
        stamps_used = [call + t for t in totals]
        timing = "history time_total_s"
    else:
        stamps_used = stamps
        timing = "checkpoint folder timestamps (rank 0, at ray.train.report)"
    return {**epoch_summary(call, stamps_used, done, args.epochs), "history": history, "data": source,
            "threads": args.threads, "processes": args.workers, "ray_init_s": ray_ready - started,
            "ray_shutdown_s": time.time() - done, "timing_source": timing,
            "history_keys": sorted(result.history[0]) if result.history else [], "error": result.error}


# --------------------------------------------------------------------------- asha


def run_asha(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from compute.ray_session import ray_session
    from compute.train import plan, tune_model
    from core.families.tabular_net import search_space_dict
    from core.settings import RaySettings, SearchSpace
    from core.training import TrainingConfig

    splits, spec, source = load_arrays(args.rows, args.feature_version)
    storage = Path(tempfile.mkdtemp(prefix="flywheel-bench-tune-"))
    try:
        with ray_session(RaySettings(num_cpus=2)):
            data_ref = ray.put({"train": splits["train"], "validation": splits["validation"], "wide_init": None})
            training = TrainingConfig(trials=args.trials, max_epochs=args.epochs,
                                      grace_period=min(args.grace_period, args.epochs), num_workers=1,
                                      max_failures=0, seed=SEED, scheduler=args.scheduler)
            call = time.time()
            outcome = tune_model(training, spec, data_ref,
                                 plan([("tabular_net", search_space_dict(SearchSpace()), args.trials)], SEED),
                                 str(storage), f"bench-{args.scheduler}")
            done = time.time()
        # Every trial-epoch's report, in global time: the Train checkpoint folders per trial.
        events = []
        train_root = Path(outcome.experiment_path) / "train"
        for trial in outcome.trials:
            stamps = checkpoint_times(train_root / f"trial_{trial.trial_id}")
            for i, row in enumerate(trial.history):
                when = stamps[i] if i < len(stamps) else None
                events.append({"trial": trial.trial_id, "epoch": row.get("epoch", i),
                               "val_loss": row.get("val_loss"), "time_total_s": row.get("time_total_s"),
                               "at_s": (when - call) if when else None})
        trials = [{"trial_id": t.trial_id, "config": t.hyperparameters, "epochs": len(t.history),
                   "final_val_loss": t.final.get("val_loss"), "error": t.error} for t in outcome.trials]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return {"scheduler": args.scheduler, "wall_s": done - call, "tune_seconds": outcome.seconds,
            "trial_epochs": outcome.trial_epochs, "best_trial": outcome.best.trial_id,
            "best_final_val_loss": outcome.best.final.get("val_loss"), "trials": trials,
            "events": events, "data": source}


def time_to_target(run: dict[str, Any], target: float, rel_tol: float) -> dict[str, Any]:
    """Trial-epochs and seconds until a report reaches ``target`` (val_loss <= target(1+tol)).

    Global order from the checkpoint timestamps when every event has one; otherwise trial
    completion order (the order Tune lists trials, each trial's epochs at its own
    time_total_s, summed as if trials ran one after another: an upper bound on wall time)."""
    events = run["events"]
    limit = target * (1 + rel_tol)
    if events and all(e["at_s"] is not None for e in events):
        ordered = sorted(events, key=lambda e: e["at_s"])
        for count, event in enumerate(ordered, 1):
            if event["val_loss"] is not None and event["val_loss"] <= limit:
                return {"reached": True, "trial_epochs": count, "seconds": event["at_s"], "order": "global"}
        return {"reached": False, "trial_epochs": len(ordered), "seconds": run["wall_s"], "order": "global"}
    count, offset = 0, 0.0
    by_trial: dict[str, list] = {}
    for event in events:
        by_trial.setdefault(event["trial"], []).append(event)
    for trial_events in by_trial.values():
        for event in trial_events:
            count += 1
            if event["val_loss"] is not None and event["val_loss"] <= limit:
                return {"reached": True, "trial_epochs": count, "seconds": offset + (event["time_total_s"] or 0),
                        "order": "completion"}
        offset += trial_events[-1]["time_total_s"] or 0
    return {"reached": False, "trial_epochs": count, "seconds": run["wall_s"], "order": "completion"}


def sample_configs(trials: int, seed: int) -> list[dict[str, Any]]:
    """The network's configs the train flow's competition samples (``compute.train.plan``)."""
    from compute.train import plan
    from core.families.tabular_net import search_space_dict
    from core.settings import get_settings

    return plan([("tabular_net", search_space_dict(get_settings().train.search_space), trials)], seed)[0].configs


# --------------------------------------------------------------------------- e2e: the plain script


def run_plain_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """Sources -> conform -> join -> features -> trials x epochs -> test AUC -> save_model.

    pandas + PyTorch + sklearn only: no Prefect, Ray, Dask, Great Expectations, Delta or MLflow.
    """
    started = time.perf_counter()
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader, TensorDataset

    from core.contract import load_contract
    from core.families import validation_metrics
    from core.families.tabular_net import seed_everything
    from core.features import (
        SPLIT_COLUMN,
        derive,
        encode,
        explicit_split,
        fit_stats,
        join_lookups,
        prepare_lookups,
        split_boundaries,
    )
    from core.ingest import SMOKE_SAMPLE_EVERY
    from core.model import ModelSpec, TabularNet, predict, save_model
    from core.sources import make_source
    from core.validation import conform
    from tasks.train import output_bias

    imported = time.perf_counter()
    stages: dict[str, float] = {}
    mark = imported

    def stage(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now

    contract = load_contract(DATASET)
    tables = {}
    for table, spec in contract.tables.items():
        batch = make_source(table, spec).read()
        if args.smoke and table == contract.base_table:
            batch = batch.iloc[::SMOKE_SAMPLE_EVERY].reset_index(drop=True)
        tables[table], _, _ = conform(batch.reset_index(drop=True), spec)
    stage("read sources + conform")
    base = tables.pop(contract.base_table)
    joined = join_lookups(base, prepare_lookups(tables, contract), contract)
    derived = derive(joined, contract)
    derived = derived[derived[contract.target.name].notna()]
    bounds = explicit_split(contract) or split_boundaries(derived[contract.time_column], contract)
    stats = fit_stats(derived, contract, *bounds)
    encoded = encode(derived, contract, stats)
    cats, nums = contract.features.categorical, contract.features.numeric
    splits = {}
    for split in ("train", "validation", "test"):
        part = encoded[encoded[SPLIT_COLUMN] == split]
        splits[split] = (part[cats].to_numpy(np.int64), part[nums].to_numpy(np.float32),
                         part[contract.target.name].to_numpy(np.float32))
    cards = stats.cardinalities()
    spec_base = {"task": contract.task, "categorical": cats, "numeric": nums,
                 "cardinalities": [cards[c] for c in cats],
                 "output_bias": output_bias(contract.task, stats.label_mean), "wide": True, "deep_numeric": False}
    stage("join + features")

    configs = json.loads(args.configs)
    categorical, numeric, target = splits["train"]
    dataset = TensorDataset(torch.as_tensor(categorical, dtype=torch.long),
                            torch.as_tensor(numeric, dtype=torch.float32),
                            torch.as_tensor(target, dtype=torch.float32))
    finished = []
    for config in configs:
        seed_everything(SEED)
        model = TabularNet(ModelSpec(**spec_base, **{k: config[k] for k in ("width", "depth", "dropout", "embedding_dim")}))
        optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
        loss_fn = torch.nn.BCEWithLogitsLoss()
        loader = DataLoader(dataset, batch_size=int(config["batch_size"]), shuffle=True,
                            generator=torch.Generator().manual_seed(SEED))
        metrics: dict[str, float] = {}
        for epoch in range(args.epochs):
            torch.manual_seed(SEED * 1_000 + epoch * 10)
            model.train()
            for cat, num, y in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(cat, num), y)
                loss.backward()
                optimizer.step()
            metrics = validation_metrics(contract.task, splits["validation"][2],
                                         predict(model, splits["validation"][0], splits["validation"][1]))
        finished.append((metrics["val_loss"], config, model))
    stage("train (trials x epochs, sequential)")
    val_loss, best_config, best = min(finished, key=lambda item: item[0])
    scores = predict(best, splits["test"][0], splits["test"][1])
    auc = float(roc_auc_score(splits["test"][2], scores))
    stage("evaluate (test AUC)")
    folder = Path(tempfile.mkdtemp(prefix="flywheel-bench-plain-model-"))
    try:
        save_model(best, folder, stats.to_json())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    stage("save_model")
    return {"seconds": time.perf_counter() - started, "import_s": imported - started, "stages": stages,
            "rows": {s: len(a[2]) for s, a in splits.items()}, "test_auc": auc, "best_val_loss": val_loss,
            "best_config": best_config, "trial_epochs": len(configs) * args.epochs,
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- families


GBDT_HPARAMS = {"learning_rate": 0.1, "num_leaves": 31, "min_data_in_leaf": 20, "feature_fraction": 1.0,
                "lambda_l2": 0.0}


def run_families(args: argparse.Namespace) -> dict[str, Any]:
    """The train flow's competition on the flights feature table, without Prefect or MLflow:
    the settings' families and budget, each family's best on the test split, the winner."""
    from core.contract import load_contract
    from core.lake import Lake
    from core.settings import RaySettings, get_settings
    from core.training import TrainingConfig
    from tasks.evaluate import evaluate, fit_linear
    from tasks.train import competition, export_families, load_training_data, tune

    settings = get_settings()
    contract = load_contract(DATASET)
    lake = next(Lake(root) for root, _ in feature_roots() if Lake(root).exists(Lake(root).uri("features", DATASET)))
    data = load_training_data(lake, contract, args.feature_version)
    training = TrainingConfig.from_settings(settings.train, seed=SEED)
    storage = Path(tempfile.mkdtemp(prefix="flywheel-bench-families-"))
    try:
        started = time.perf_counter()
        linear = fit_linear(data)
        outcome = tune(data, RaySettings(num_cpus=2), training,
                       competition(settings.train.families, training, settings.train.search_space), storage,
                       "bench-families", wide_init=linear.wide_init)
        tuned = time.perf_counter()
        exported = export_families(data, outcome, storage / "models")
        evaluation = evaluate({f: m for f, (m, _) in exported.items()},
                              outcome.family_losses(),
                              data, settings.train.register_margin, None, lake, contract)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    families = {s.family: {"val_loss": s.val_loss, **s.scored.metrics,
                           "trials": sum(1 for t in outcome.trials if t.family == s.family),
                           "iterations": sum(len(t.history) for t in outcome.trials if t.family == s.family)}
                for s in evaluation.families}
    return {"winner": evaluation.family, "families": families,
            "prior": evaluation.baselines[0].metrics, "decision": evaluation.decision.reasons,
            "tune_s": tuned - started, "seconds": time.perf_counter() - started,
            "data": {"version": data.feature_version, "rows": {s: len(a) for s, a in data.splits.items()}}}


def run_gbdt_ray(args: argparse.Namespace) -> dict[str, Any]:
    """The gbdt family on Ray Train's LightGBMTrainer: one worker with ``--threads`` threads."""
    import ray

    from compute.ray_session import ray_session
    from compute.train import fit
    from core.settings import RaySettings

    splits, spec, source = load_arrays(args.rows, args.feature_version)
    storage = Path(tempfile.mkdtemp(prefix="flywheel-bench-gbdt-"))
    try:
        with ray_session(RaySettings(num_cpus=2)):
            data_ref = ray.put({"train": splits["train"], "validation": splits["validation"]})
            loop = loop_config(spec, args.epochs, args.threads, 1)
            call = time.time()
            result = fit(loop, "gbdt", {**GBDT_HPARAMS, "rounds_per_iteration": args.rounds}, data_ref,
                         str(storage), "gbdt-bench")
            done = time.time()
        stamps = checkpoint_times(storage)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return {"stamps": [t - call for t in stamps], "wall_s": done - call, "rounds_per_report": args.rounds,
            "reports": len(result.history), "val_loss": [r.get("val_loss") for r in result.history],
            "error": result.error, "threads": args.threads, "data": source}


def run_gbdt_plain(args: argparse.Namespace) -> dict[str, Any]:
    """Plain LightGBM with the gbdt family's parameters and the same threads: ``lightgbm.train``
    on the same arrays, a timestamp every ``--rounds`` rounds (no validation, no checkpoint)."""
    import lightgbm as lgb
    import numpy as np

    from core.families.gbdt import GbdtFamily

    splits, spec, source = load_arrays(args.rows, args.feature_version)
    cat, num, y = splits["train"]
    params = GbdtFamily().params(spec["task"], GBDT_HPARAMS, args.threads, SEED)
    stamps: list[float] = []

    def stamp(env: Any) -> None:
        if (env.iteration + 1) % args.rounds == 0:
            stamps.append(time.time())

    call = time.time()
    train_set = lgb.Dataset(np.hstack([cat.astype(np.float64), num.astype(np.float64)]), label=y,
                            categorical_feature=list(range(cat.shape[1])), free_raw_data=False)
    lgb.train(params, train_set, num_boost_round=args.epochs * args.rounds, callbacks=[stamp])
    done = time.time()
    return {"stamps": [t - call for t in stamps], "wall_s": done - call, "rounds_per_report": args.rounds,
            "reports": len(stamps), "threads": args.threads, "data": source}


def per_round(run: dict[str, Any]) -> float | None:
    """Seconds per boosting round after the first report (start-up and the first block excluded)."""
    stamps = run["stamps"]
    if len(stamps) < 2:
        return None
    return (stamps[-1] - stamps[0]) / ((len(stamps) - 1) * run["rounds_per_report"])


# --------------------------------------------------------------------------- child entry


def child_main(args: argparse.Namespace) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")  # float(loss), as the Ray loop
    runner = {"epoch-ray": run_epoch_ray, "epoch-plain": run_epoch_plain, "epoch-ddp": run_epoch_ddp,
              "asha": run_asha, "plain-e2e": run_plain_e2e, "families": run_families, "gbdt-ray": run_gbdt_ray,
              "gbdt-plain": run_gbdt_plain}[args.variant]
    result = runner(args)
    result["variant"] = args.variant
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)


# --------------------------------------------------------------------------- parent helpers


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", GX_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0",
                PREFECT_SERVER_ANALYTICS_ENABLED="false")


def run_child(variant: str, extra: list[str], timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.training", "--variant", variant, *extra]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"variant {variant} timed out after {timeout_s:.0f}s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-30:])
        raise RuntimeError(f"variant {variant} failed (exit {done.returncode}):\n{tail}")
    result = json.loads(lines[-1].removeprefix(RESULT_MARKER))
    result["process_wall_s"] = time.perf_counter() - started
    return result


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    import psutil

    versions = {}
    for package in ("torch", "ray", "prefect", "pandas", "numpy", "scikit-learn"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mark(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]missed[/]"


# --------------------------------------------------------------------------- sub-benchmarks


def bench_epoch(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from rich.table import Table

    rows = args.rows or (20_000 if args.quick else None)
    epochs = args.epochs or (3 if args.quick else 5)
    common = ["--epochs", str(epochs)] + (["--rows", str(rows)] if rows else []) + _pin(args)
    pairs = [("1 worker", [("epoch-ray", ["--workers", "1", "--threads", "2"]),
                           ("epoch-plain", ["--threads", "2"])])]
    if 2 in args.workers_list:
        pairs.append(("2 workers (DDP)", [("epoch-ray", ["--workers", "2", "--threads", "1"]),
                                           ("epoch-ddp", ["--workers", "2"])]))
    if 1 not in args.workers_list:
        pairs = pairs[1:]
    out: dict[str, Any] = {"epochs": epochs, "rows_requested": rows, "comparisons": []}
    table = Table(title=f"epoch: Ray Train vs plain PyTorch ({epochs} epochs)")
    for column in ("processes", "variant", "train rows", "per epoch s (median 2..E)", "ray/plain",
                   "fixed s", "wall s", "final val_loss"):
        table.add_column(column, justify="left" if column in ("processes", "variant") else "right", no_wrap=True)
    for label, variants in pairs:
        runs = {}
        for variant, extra in variants:
            console.print(f"  epoch {label}: {variant} ...")
            tries = [run_child(variant, common + extra, args.timeout) for _ in range(args.repeats)]
            best = min(tries, key=lambda r: r["per_epoch_median_s"])
            best["all_per_epoch_median_s"] = [round(r["per_epoch_median_s"], 3) for r in tries]
            runs[variant] = best
        ray_run = runs["epoch-ray"]
        plain_name = variants[1][0]
        plain = runs[plain_name]
        ratio = ray_run["per_epoch_median_s"] / plain["per_epoch_median_s"]
        out["comparisons"].append({"label": label, "ray": ray_run, "plain": plain, "ratio": ratio,
                                   "goal_met": ratio <= 1.10})
        for name, r in ((f"ray train ({r_t(ray_run)})", ray_run), (f"{plain_name} ({r_t(plain)})", plain)):
            table.add_row(label, name, f"{r['data']['rows']['train']:,}", _fmt(r["per_epoch_median_s"], 3),
                          _fmt(ratio) if r is ray_run else "", _fmt(r["fixed_s"], 1), _fmt(r["wall_s"], 1),
                          _fmt((r["history"] or [{}])[-1].get("val_loss"), 4))
    console.print(table)
    for c in out["comparisons"]:
        r = c["ray"]
        console.print(f"{c['label']}: Ray/plain per epoch {c['ratio']:.2f} (goal <= 1.10: {_mark(c['goal_met'])}); "
                      f"Ray fixed {r['fixed_s']:.1f}s (+ ray.init {r['ray_init_s']:.1f}s, shutdown "
                      f"{r['ray_shutdown_s']:.1f}s); timing from {r['timing_source']}; data: {r['data']['kind']}")
    return out


def _pin(args: argparse.Namespace) -> list[str]:
    return [] if args.feature_version is None else ["--feature-version", str(args.feature_version)]


def r_t(run: dict[str, Any]) -> str:
    return f"{run['processes']}p x {run['threads']}t"


def bench_asha(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from rich.table import Table

    rows = args.rows or (20_000 if args.quick else None)
    trials = args.trials or (4 if args.quick else 8)
    epochs = args.epochs or (3 if args.quick else 6)
    common = ["--trials", str(trials), "--epochs", str(epochs), "--grace-period", str(args.grace_period)]
    common += (["--rows", str(rows)] if rows else []) + _pin(args)
    runs = {}
    for scheduler in ("fifo", "asha"):
        console.print(f"  asha: {scheduler} ({trials} trials x up to {epochs} epochs) ...")
        runs[scheduler] = run_child("asha", common + ["--scheduler", scheduler], args.timeout)
    fifo, asha = runs["fifo"], runs["asha"]
    target = min(e["val_loss"] for e in fifo["events"] if e["val_loss"] is not None)
    reach = {name: time_to_target(run, target, args.tolerance) for name, run in runs.items()}
    same_configs = ([t["config"] for t in sorted(fifo["trials"], key=lambda t: t["trial_id"][-5:])]
                    == [t["config"] for t in sorted(asha["trials"], key=lambda t: t["trial_id"][-5:])])
    epochs_ratio = reach["asha"]["trial_epochs"] / reach["fifo"]["trial_epochs"]
    time_ratio = reach["asha"]["seconds"] / reach["fifo"]["seconds"]
    table = Table(title=f"asha: ASHA vs random search, {trials} trials x up to {epochs} epochs "
                        f"(target val_loss {target:.5f})")
    for column in ("scheduler", "reached", "trial-epochs to target", "s to target", "trial-epochs total",
                   "wall s total", "best final val_loss"):
        table.add_column(column, justify="left" if column == "scheduler" else "right", no_wrap=True)
    for name, run in runs.items():
        table.add_row(name, str(reach[name]["reached"]), str(reach[name]["trial_epochs"]),
                      _fmt(reach[name]["seconds"], 1), str(run["trial_epochs"]), _fmt(run["wall_s"], 1),
                      _fmt(run["best_final_val_loss"], 5))
    console.print(table)
    ok = reach["asha"]["reached"] and epochs_ratio <= 0.5 and time_ratio <= 0.5
    console.print(f"ASHA/random: trial-epochs {epochs_ratio:.2f}, wall {time_ratio:.2f} (goal <= 0.5: {_mark(ok)}); "
                  f"same configs sampled: {same_configs}; order: {reach['asha']['order']}")
    return {"trials": trials, "max_epochs": epochs, "grace_period": args.grace_period, "target_val_loss": target,
            "tolerance": args.tolerance, "same_configs": same_configs, "reach": reach,
            "trial_epochs_ratio": epochs_ratio, "time_ratio": time_ratio, "goal_met": ok, "runs": runs}


LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| (\w+)\s*\| (.*)$")


def parse_flow_log(text: str, started_wall: float) -> dict[str, Any]:
    """Seconds (from process start) of the flow's log markers. Prefect prints HH:MM:SS.mmm."""
    base = datetime.fromtimestamp(started_wall)
    marks: dict[str, float] = {}
    trial_epochs = 0
    previous = None
    lines = []
    for line in text.splitlines():
        match = LOG_LINE.match(line.strip())
        if not match:
            continue
        lines.append(line.strip()[:240])
        h, m, s, ms, _, message = match.groups()
        stamp = base.replace(hour=int(h), minute=int(m), second=int(s), microsecond=int(ms) * 1000)
        at = stamp.timestamp() - started_wall
        if at < -60:  # past midnight
            at += 86_400
        if re.search(r"trial \S+ epoch \d+:", message):
            trial_epochs += 1

        def first(key: str) -> None:
            marks.setdefault(key, at)  # noqa: B023

        if "Beginning flow run" in message:
            first("flow_begin")
            for sub in ("ingest", "etl"):
                if f"for flow '{sub}'" in message:
                    first(f"{sub}_begin")
        if "training data:" in message:
            first("training_data")
        if "Ray ready" in message:
            first("ray_ready")
            marks.setdefault("before_ray_ready", previous if previous is not None else at)
        if "tuning:" in message:
            first("tuning")
        if "best trial" in message:
            first("best_trial")
        if re.search(r"trials done\)", message):
            marks["last_trial_done"] = at
        if "Finished in state" in message:
            marks["last_finished"] = at
        marks["last_line"] = at
        previous = at
    marks["trial_epochs_logged"] = trial_epochs
    marks.setdefault("best_trial", marks.get("last_trial_done", float("nan")))
    marks["log_lines"] = lines[-80:]  # for checking the attribution by eye
    return marks


def run_flow(extra: list[str], home: Path, prefect_home: Path, timeout_s: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "flows.train", *extra, "--home", str(home), "--no-register"]
    env = dict(_env(), PREFECT_HOME=str(prefect_home), COLUMNS="400", PREFECT_LOGGING_COLORS="false")
    started_wall = time.time()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = "\n".join((done.stderr + done.stdout).strip().splitlines()[-30:])
        raise RuntimeError(f"flows.train {extra} failed (exit {done.returncode}):\n{tail}")
    marks = parse_flow_log(done.stdout + "\n" + done.stderr, started_wall)
    pre_flow = marks.get("flow_begin", float("nan"))
    ray_start = marks.get("ray_ready", float("nan")) - marks.get("before_ray_ready", float("nan"))
    teardown = wall - marks.get("last_finished", wall)
    return {"command": " ".join(command[1:]), "wall_s": wall, "marks": marks,
            "fixed": {"before_flow_s": pre_flow, "ray_start_s": ray_start},
            "fixed_s": pre_flow + ray_start, "teardown_s": teardown,
            "stages": {"ingest + etl (subflows)": marks.get("training_data", float("nan")) - pre_flow,
                       "ray start (+ MLflow set-up)": ray_start,
                       "tuning": marks.get("best_trial", float("nan")) - marks.get("tuning", float("nan")),
                       "export, evaluate, baselines, MLflow": marks.get("last_finished", float("nan"))
                       - marks.get("best_trial", float("nan"))}}


def bench_e2e(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from rich.table import Table

    from core.settings import get_settings

    cases = [("smoke", ["--smoke-test"])] + ([] if args.quick else [("default", [])])
    if args.e2e_cases:
        cases = [c for c in cases if c[0] in args.e2e_cases] or [("smoke", ["--smoke-test"])]
    workdir = Path(tempfile.mkdtemp(prefix="flywheel-bench-e2e-"))
    prefect_home = workdir / "prefect-home"  # isolated from other flows on this machine
    settings = get_settings().train
    out: dict[str, Any] = {"cases": {}, "prefect_home": "fresh per benchmark run (shared by its repeats)",
                           "prefect_api_url": os.environ.get("PREFECT_API_URL")}
    table = Table(title="e2e: flows.train vs a plain script (same stages)")
    for column in ("case", "variant", "wall s", "fixed start-up s", "teardown s", "wall excl. start-up s",
                   "flow/plain", "excl. start-up", "trial-epochs", "test AUC"):
        table.add_column(column, justify="left" if column in ("case", "variant") else "right", no_wrap=True)
    try:
        for case, extra in cases:
            if case == "smoke":
                budget = {"trials": 2, "max_epochs": 2}  # flows.train SMOKE_BUDGET
                budget.update(args.e2e_budget or {})
            else:
                budget = {"trials": settings.trials, "max_epochs": settings.max_epochs}
            flow_extra = [*extra, "--trials", str(budget["trials"]), "--max-epochs", str(budget["max_epochs"])]
            configs = sample_configs(budget["trials"], settings.seed)
            flows, plains = [], []
            try:
                for attempt in range(args.repeats):
                    home = workdir / f"home-{case}-{attempt}"
                    console.print(f"  e2e {case}: flows.train (run {attempt + 1}/{args.repeats}) ...")
                    flows.append(run_flow(flow_extra, home, prefect_home, args.timeout))
                    shutil.rmtree(home, ignore_errors=True)
                    console.print(f"  e2e {case}: plain script (run {attempt + 1}/{args.repeats}) ...")
                    plains.append(run_child("plain-e2e", ["--epochs", str(budget["max_epochs"]), "--configs",
                                                          json.dumps(configs)]
                                            + (["--smoke"] if case == "smoke" else []), args.timeout))
            except Exception as exc:  # noqa: BLE001 - keep the cases already measured
                console.print(f"[red]e2e {case} failed:[/] {exc}")
                out["cases"][case] = {"budget": budget, "error": str(exc)}
                continue
            flow = min(flows, key=lambda r: r["wall_s"] - r["fixed_s"])
            plain = min(plains, key=lambda r: r["seconds"])
            plain_wall = plain["process_wall_s"]
            plain_excl = plain["seconds"] - plain["import_s"]
            flow_excl = flow["wall_s"] - flow["fixed_s"]
            ratio, ratio_excl = flow["wall_s"] / plain_wall, flow_excl / plain_excl
            out["cases"][case] = {"budget": budget, "configs": configs, "flow": flow, "plain": plain,
                                  "all_flow_wall_s": [round(f["wall_s"], 1) for f in flows],
                                  "all_plain_wall_s": [round(p["process_wall_s"], 1) for p in plains],
                                  "ratio": ratio, "ratio_excl_startup": ratio_excl,
                                  "ratio_excl_startup_and_teardown": (flow_excl - flow["teardown_s"]) / plain_excl,
                                  "goal_met": ratio_excl <= 1.3}
            table.add_row(case, "flows.train", _fmt(flow["wall_s"], 1), _fmt(flow["fixed_s"], 1),
                          _fmt(flow["teardown_s"], 1), _fmt(flow_excl, 1), _fmt(ratio), _fmt(ratio_excl),
                          str(flow["marks"].get("trial_epochs_logged")), "")
            table.add_row(case, "plain script", _fmt(plain_wall, 1), _fmt(plain["import_s"] + plain_wall
                                                                          - plain["seconds"], 1),
                          "", _fmt(plain_excl, 1), "", "", str(plain["trial_epochs"]), _fmt(plain["test_auc"], 4))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    console.print(table)
    for case, c in out["cases"].items():
        if "error" in c:
            continue
        f = c["flow"]
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in f["stages"].items())
        console.print(f"{case}: flow/plain excl. start-up {c['ratio_excl_startup']:.2f} (goal <= 1.3: "
                      f"{_mark(c['goal_met'])}); flow start-up: before flow {f['fixed']['before_flow_s']:.1f}s, "
                      f"ray {f['fixed']['ray_start_s']:.1f}s; flow stages: {stages}")
        console.print(f"{case}: plain stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in c["plain"]["stages"].items()))
    return out


def bench_coldstart(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    commands = {"flows.train --help": [sys.executable, "-m", "flows.train", "--help"],
                "import prefect": [sys.executable, "-c", "import prefect"]}
    times: dict[str, list[float]] = {k: [] for k in commands}
    for attempt in range(args.coldstart_runs):
        for name, command in commands.items():  # alternating
            started = time.perf_counter()
            done = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=args.timeout)
            times[name].append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed: {done.stderr[-2000:]}")
        console.print(f"  coldstart run {attempt + 1}/{args.coldstart_runs}: "
                      + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    medians = {k: statistics.median(v) for k, v in times.items()}
    gap = medians["flows.train --help"] - medians["import prefect"]
    console.print(f"coldstart: flows.train --help median {medians['flows.train --help']:.2f}s, import prefect "
                  f"median {medians['import prefect']:.2f}s, gap {gap:.2f}s (goal <= 1 s: {_mark(gap <= 1.0)})")
    return {"runs": times, "medians": medians, "gap_s": gap, "goal_met": gap <= 1.0}


def bench_families(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from rich.table import Table

    run = run_child("families", _pin(args), args.timeout)
    table = Table(title=f"The competition on flights (feature version {run['data']['version']}, "
                        f"settings' families and budget): each family's best")
    for column in ("family", "trials", "iterations", "val_loss", "test roc_auc", "test log_loss"):
        table.add_column(column)
    for family, values in run["families"].items():
        table.add_row(family + (" (winner)" if family == run["winner"] else ""), str(values["trials"]),
                      str(values["iterations"]), _fmt(values["val_loss"], 4), _fmt(values["roc_auc"], 4),
                      _fmt(values["log_loss"], 4))
    table.add_row("prior", "", "", "", _fmt(run["prior"]["roc_auc"], 4), _fmt(run["prior"]["log_loss"], 4))
    console.print(table)
    console.print(f"tuning {run['tune_s']:.1f} s; {run['decision'][0]}")
    return run


def bench_gbdt(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    """LightGBM per boosting round: Ray Train's LightGBMTrainer (1 worker, 2 threads, the gbdt
    family's fit with its per-block validation and checkpoint) vs plain ``lightgbm.train``
    (2 threads), alternating, best of ``--repeats``."""
    rounds = 40  # the gbdt family's default block
    epochs = args.epochs or (4 if args.quick else 8)
    extra = [*_pin(args), "--threads", "2", "--epochs", str(epochs), "--rounds", str(rounds),
             *(["--rows", str(args.rows or 20_000)] if args.quick or args.rows else [])]
    runs: dict[str, list[dict[str, Any]]] = {"gbdt-ray": [], "gbdt-plain": []}
    for _ in range(args.repeats):
        for variant in runs:
            runs[variant].append(run_child(variant, extra, args.timeout))
    best = {v: min((r for r in rs if per_round(r)), key=lambda r: per_round(r) or math.inf) for v, rs in runs.items()}
    ray_s, plain_s = per_round(best["gbdt-ray"]), per_round(best["gbdt-plain"])
    ratio = ray_s / plain_s if ray_s and plain_s else None
    console.print(f"gbdt per boosting round: Ray Train {_fmt(ray_s * 1000 if ray_s else None)} ms, plain LightGBM "
                  f"{_fmt(plain_s * 1000 if plain_s else None)} ms, ratio {_fmt(ratio)} (goal <= 1.2: "
                  f"{_mark(ratio is not None and ratio <= 1.2)}); {epochs} blocks of {rounds} rounds, 2 threads, "
                  f"{best['gbdt-plain']['data']['rows']['train']:,} training rows")
    return {"per_round_s": {"ray_train": ray_s, "plain": plain_s}, "ratio": ratio,
            "goal_met": ratio is not None and ratio <= 1.2, "runs": runs, "blocks": epochs, "rounds_per_block": rounds}


# --------------------------------------------------------------------------- parent


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def parent_main(args: argparse.Namespace) -> None:
    from rich.console import Console

    console = Console(width=max(110, shutil.get_terminal_size().columns))
    output = Path(args.output)
    try:
        payload = json.loads(output.read_text())
    except (OSError, ValueError):
        payload = {}
    payload.update({"benchmark": "training", "machine": machine()})
    payload.setdefault("results", {})
    if args.feature_version is None and {"epoch", "asha", "families", "gbdt"} & set(args.only):
        args.feature_version = pinned_feature_version()
        console.print(f"feature table version pinned for epoch/asha: {args.feature_version}")
    benches = {"epoch": bench_epoch, "asha": bench_asha, "e2e": bench_e2e, "coldstart": bench_coldstart,
               "families": bench_families, "gbdt": bench_gbdt}
    failures = []
    for name in args.only:
        console.print(f"[bold]{name}[/]")
        started = time.perf_counter()
        try:
            section = benches[name](args, console)
        except Exception as exc:  # noqa: BLE001 - report, keep the other sub-benchmarks
            console.print(f"[red]{name} failed:[/] {exc}")
            failures.append(name)
            continue
        section.update({"when": datetime.now(UTC).isoformat(timespec="seconds"), "quick": args.quick,
                        "bench_seconds": round(time.perf_counter() - started, 1),
                        "load_avg_after": [round(x, 2) for x in os.getloadavg()]})
        payload["results"][name] = section
        write_json(output, payload)
    console.print(f"results: {output}")
    if failures:
        raise SystemExit(f"failed: {', '.join(failures)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SUBS, default=list(SUBS), help="Sub-benchmarks to run.")
    parser.add_argument("--quick", action="store_true",
                        help="20k training rows, epoch: 3 epochs, asha: 4 trials x 3 epochs, e2e: smoke only.")
    parser.add_argument("--rows", type=int, default=None,
                        help="epoch/asha: about this many training rows (every k-th row; default all, 20k quick).")
    parser.add_argument("--epochs", type=int, default=None, help="epoch: epochs (5; quick 3); asha: max epochs (6; quick 3).")
    parser.add_argument("--trials", type=int, default=None, help="asha: trials (8; quick 4).")
    parser.add_argument("--grace-period", type=int, default=1, help="asha: ASHA grace period.")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="asha: relative tolerance on reaching the random search's best val_loss.")
    parser.add_argument("--workers-list", type=int, nargs="+", default=[1, 2], choices=[1, 2],
                        help="epoch: which process counts to compare.")
    parser.add_argument("--e2e-cases", nargs="+", choices=["smoke", "default"], default=None,
                        help="e2e: which flow runs (default: smoke, and default unless --quick).")
    parser.add_argument("--e2e-budget", type=json.loads, default=None,
                        help='e2e smoke: override the budget, e.g. \'{"trials": 1, "max_epochs": 1}\'.')
    parser.add_argument("--repeats", type=int, default=1, help="epoch/e2e: fresh runs per variant; best kept.")
    parser.add_argument("--coldstart-runs", type=int, default=5, help="coldstart: runs of each command.")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds allowed per child run.")
    parser.add_argument("--feature-version", type=int, default=None,
                        help="epoch/asha: feature table version (default: the latest at start, pinned).")
    parser.add_argument("--output", default=str(RESULTS_PATH), help="JSON results (merged by sub-benchmark).")
    # Child mode (used by the parent).
    parser.add_argument("--variant", choices=CHILD_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--scheduler", choices=["asha", "fifo"], default="asha", help=argparse.SUPPRESS)
    parser.add_argument("--configs", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=25, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
