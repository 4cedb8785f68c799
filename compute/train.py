"""Training on Ray: the Ray Train loop (PyTorch DDP), one fit, and Ray Tune (ASHA) over fits.

Train V2 refuses ``Tuner(TorchTrainer(...))``: each Tune trial is a plain function that builds
and fits a ``TorchTrainer`` and reports back through ``TuneReportCallback``. The trial function
holds no CPU (``{"cpu": 0, "memory": 1}``) so that its Train workers can have them, and trials
run ``CPUs // num_workers`` at a time, so 2 CPUs never deadlock.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the flow, not only Tune
HYPERPARAMETERS = ("lr", "width", "depth", "dropout", "embedding_dim", "batch_size", "weight_decay")
CHECKPOINT_FILE = "state.pt"


# --------------------------------------------------------------------------- worker side
def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _val_metrics(model: Any, data: tuple, task: str) -> dict[str, float]:
    import torch

    from core.model import predict

    categorical, numeric, target = data
    module = model.module if hasattr(model, "module") else model
    scores = predict(module, categorical, numeric)
    y = torch.as_tensor(target)
    s = torch.as_tensor(scores)
    if task == "classification":
        from sklearn.metrics import roc_auc_score

        eps = 1e-7
        loss = -(y * torch.log(s.clamp(eps, 1 - eps)) + (1 - y) * torch.log((1 - s).clamp(eps, 1 - eps)))
        auc = roc_auc_score(target, scores) if 0 < target.mean() < 1 else float("nan")
        return {"val_loss": float(loss.mean()), "val_auc": float(auc)}
    mse = float(((s - y) ** 2).mean())
    return {"val_loss": mse, "val_rmse": mse**0.5}


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DDP over the workers, a checkpoint and a report per
    epoch, resuming from the last checkpoint after a failure."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from core.model import ModelSpec, TabularNet

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    data = ray.get(config["data_ref"])
    spec = ModelSpec(**config["spec"], **{k: config[k] for k in ("width", "depth", "dropout", "embedding_dim")})
    seed = int(config["seed"])
    _seed_everything(seed)
    model = TabularNet(spec)
    if spec.wide and data.get("wide_init"):
        model.load_wide(**data["wide_init"])
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1 (gloo on CPUs, nccl on GPUs)
    device = ray.train.torch.get_device()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    loss_fn = torch.nn.BCEWithLogitsLoss() if spec.task == "classification" else torch.nn.MSELoss()

    categorical, numeric, target = data["train"]
    dataset = TensorDataset(torch.as_tensor(categorical, dtype=torch.long),
                            torch.as_tensor(numeric, dtype=torch.float32),
                            torch.as_tensor(target, dtype=torch.float32))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=int(config["batch_size"]), sampler=sampler)

    if rank == 0 and config.get("pg_file"):
        # Record this attempt's placement group so the Tune driver can free it (see _reaper).
        group = ray.util.get_current_placement_group()
        if group is not None:
            with open(config["pg_file"], "a") as handle:
                handle.write(group.id.hex() + "\n")

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1

    for epoch in range(start_epoch, int(config["epochs"])):
        _maybe_fail(config, epoch, rank, world)
        sampler.set_epoch(epoch)
        torch.manual_seed(seed * 1_000 + epoch * 10 + rank)  # dropout: the same after a resume
        model.train()
        total, batches = 0.0, 0
        for cat, num, y in loader:
            cat, num, y = cat.to(device), num.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(cat, num), y)
            loss.backward()
            optimizer.step()
            total += float(loss)
            batches += 1
        metrics = {"epoch": epoch, "train_loss": total / max(1, batches),
                   **_val_metrics(model, data["validation"], spec.task)}
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch}, Path(folder) / CHECKPOINT_FILE)
                saved = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=saved)  # every rank reports (a barrier)


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def _maybe_fail(config: dict[str, Any], epoch: int, rank: int, world: int) -> None:
    """Fault injection for tests: the last worker dies once at ``fail_at_epoch``."""
    marker = config.get("fail_marker")
    if marker and epoch == config.get("fail_at_epoch") and rank == world - 1 and not os.path.exists(marker):
        Path(marker).write_text(str(time.time()))
        # Let the controller commit the previous epoch's report first (it polls every ~2 s).
        time.sleep(float(config.get("fail_delay_s", 4)))
        os._exit(1)


# --------------------------------------------------------------------------- driver side
def share(payload: dict[str, Any]) -> Any:
    """Put the training arrays in Ray's object store once; every worker reads the reference."""
    import ray

    return ray.put(payload)


@dataclass
class FitResult:
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint_path: str | None
    error: str | None = None


def fit(loop_config: dict[str, Any], num_workers: int, storage_path: str, name: str,
        max_failures: int = 2, callbacks: list | None = None) -> FitResult:
    """One Ray Train fit (used directly and by each Tune trial)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from compute.ddp import LoopbackTorchConfig

    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=LoopbackTorchConfig(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=bool(loop_config.get("use_gpu"))),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=callbacks or []),
    )
    result = trainer.fit()
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    return FitResult(dict(result.metrics or {}), history,
                     result.checkpoint.path if result.checkpoint else None,
                     str(result.error) if result.error else None)


def _trial(config: dict[str, Any]) -> None:
    """A Tune trial: fit a TorchTrainer with this trial's hyperparameters."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    loop_config = dict(config["base"], **{k: config[k] for k in HYPERPARAMETERS})
    pg_file = Path(config["base"]["storage_path"]) / f"pg_{trial_id}"
    loop_config["pg_file"] = str(pg_file)
    fit(loop_config, config["base"]["num_workers"], config["base"]["storage_path"],
        name=f"trial_{trial_id}", max_failures=config["base"]["max_failures"],
        callbacks=[TuneReportCallback()])


def _reaper(storage_path: str) -> Any:
    """Tune callback that frees a stopped trial's Train placement group.

    When Tune stops a trial (ASHA, or its last epoch) it kills the trial actor before the
    Train controller releases its workers' placement group; without Ray's dashboard (state API)
    nothing reclaims it and the next trial waits forever for CPUs.
    """
    from ray import tune

    class PlacementGroupReaper(tune.Callback):
        def _reap(self, trial: Any) -> None:
            from ray.util import placement_group_table, remove_placement_group
            from ray.util.placement_group import PlacementGroup

            record = Path(storage_path) / f"pg_{trial.trial_id}"
            if not record.exists():
                return
            from ray._raylet import PlacementGroupID

            for hex_id in set(record.read_text().split()):
                state = placement_group_table().get(hex_id, {}).get("state")
                if state and state != "REMOVED":
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id))))

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001, ANN003
            self._reap(trial)

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001, ANN003
            self._reap(trial)

    return PlacementGroupReaper()


def _progress() -> Any:
    """Tune callback: one log line per trial epoch (Prefect shows it), instead of Tune's tables."""
    from ray import tune

    class Progress(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001, ANN003
            shown = {k: round(float(result[k]), 4) for k in ("train_loss", "val_loss", "val_auc", "val_rmse")
                     if k in result}
            log.info("trial %s epoch %s: %s", trial.trial_id, result.get("epoch"), shown)

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001, ANN003
            log.info("trial %s finished after %s epochs", trial.trial_id,
                     (trial.last_result or {}).get("training_iteration"))

    return Progress()


@dataclass
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint_path: str | None
    error: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def best_epoch(self, metric: str) -> dict[str, Any]:
        """The epoch with the best validation metric (early stopping picks its checkpoint)."""
        rows = [r for r in self.history if r.get("checkpoint_path") and r.get(metric) == r.get(metric)]
        return min(rows, key=lambda r: r[metric]) if rows else {}


@dataclass
class TuneOutcome:
    best: TrialOutcome
    best_epoch: dict[str, Any]
    trials: list[TrialOutcome]
    seconds: float
    experiment_path: str
    trial_epochs: int = field(default=0)

    @property
    def epochs_trained(self) -> int:
        return int(self.best_epoch["epoch"]) + 1


def search_space(space: Any, seed: int) -> dict[str, Any]:
    from ray import tune

    return {
        "lr": tune.loguniform(*space.lr),
        "width": tune.choice(space.width),
        "depth": tune.choice(space.depth),
        "dropout": tune.choice(space.dropout),
        "embedding_dim": tune.choice(space.embedding_dim),
        "batch_size": tune.choice(space.batch_size),
        "weight_decay": tune.loguniform(*space.weight_decay),
    }


def tune_model(base: dict[str, Any], space: dict[str, Any], trials: int, max_epochs: int,
               grace_period: int, storage_path: str, name: str, seed: int,
               scheduler: str = "asha", metric: str = "val_loss") -> TuneOutcome:
    """Ray Tune over Ray Train fits. ``base`` holds the data reference, spec and budget."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    started = time.perf_counter()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrent = max(1, cpus // base["num_workers"])
    train_storage = str(Path(storage_path) / name / "train")
    Path(train_storage).mkdir(parents=True, exist_ok=True)
    base = dict(base, epochs=max_epochs, storage_path=train_storage,
                threads_per_worker=max(1, cpus // (base["num_workers"] * concurrent)))
    trainable = tune.with_resources(_trial, {"cpu": 0, "memory": 1})
    chosen = (ASHAScheduler(time_attr="training_iteration", max_t=max_epochs, grace_period=grace_period)
              if scheduler == "asha" else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        param_space={**space, "base": base},
        # The seeded generator carries the concurrency limit itself: Tune ignores
        # max_concurrent_trials when a search algorithm is given.
        tune_config=tune.TuneConfig(metric=metric, mode="min", num_samples=trials, scheduler=chosen,
                                    search_alg=BasicVariantGenerator(random_state=seed,
                                                                     max_concurrent=concurrent)),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(storage_path)),
                                  callbacks=[_reaper(train_storage), _progress()], verbose=0),
    )
    log.info("tuning: %d trials, %d at a time, up to %d epochs (%s)", trials, concurrent, max_epochs, scheduler)
    grid = tuner.fit()
    outcomes = []
    for result in grid:
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        config = {k: result.config[k] for k in HYPERPARAMETERS}
        outcomes.append(TrialOutcome(
            trial_id=str((result.metrics or {}).get("trial_id", result.path.rsplit("_", 1)[-1])),
            config=config, history=[_plain(h) for h in history],
            checkpoint_path=(result.metrics or {}).get("checkpoint_path"),
            error=str(result.error) if result.error else None))
    finished = [o for o in outcomes if o.best_epoch(metric)]
    if not finished:
        errors = "; ".join(o.error or "no epochs" for o in outcomes)
        raise RuntimeError(f"no Tune trial finished an epoch: {errors}")
    # Model selection over every trial's every epoch: the checkpoint with the best validation
    # metric (early stopping), not only each trial's last epoch.
    best = min(finished, key=lambda o: o.best_epoch(metric)[metric])
    return TuneOutcome(best, best.best_epoch(metric), outcomes, time.perf_counter() - started,
                       str(Path(storage_path) / name), trial_epochs=sum(len(o.history) for o in outcomes))


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("epoch", "train_loss", "val_loss", "val_auc", "val_rmse", "training_iteration", "time_total_s",
            "checkpoint_path")
    return {k: (float(v) if isinstance(v, np.floating | float) else int(v) if isinstance(v, np.integer) else v)
            for k, v in row.items() if k in keep}


def load_checkpoint_state(checkpoint_path: str) -> dict[str, Any]:
    """The model state dict saved by the train loop (tensors only, loaded weights-only)."""
    import torch

    return torch.load(Path(checkpoint_path) / CHECKPOINT_FILE, weights_only=True)["model"]
