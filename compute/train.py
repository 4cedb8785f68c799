"""Training on Ray: the epoch loop (PyTorch), one Ray Train fit (DDP), and Ray Tune (ASHA).

Tune trials run one of two ways, with the same epoch loop, checkpoints and reports:
- one worker (``num_workers: 1``): the trial trains in its own actor process, which Tune
  reuses for the next trial (``reuse_actors``). No Train controller or worker group is
  started, so after the first trial a trial's start-up is well under a second; Tune restores
  a failed trial from its last checkpoint (``max_failures``).
- several workers: Train V2 refuses ``Tuner(TorchTrainer(...))``, so each trial is a plain
  function that builds and fits a ``TorchTrainer`` (DDP) and reports back through
  ``TuneReportCallback``. The trial function holds no CPU (``{"cpu": 0, "memory": 1}``) so
  that its Train workers can have them.
Trials run ``CPUs // num_workers`` at a time, so 2 CPUs never deadlock.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.training import (
    EPOCH_METRICS,
    HYPERPARAMETERS,
    SELECTION_METRIC,
    FaultInjection,
    Hyperparameters,
    LoopConfig,
    TrainingConfig,
)

log = logging.getLogger(__name__)

os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the flow, not only Tune
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


@dataclass
class Session:
    """What the epoch loop needs from whoever runs it: a Ray Train worker, a Tune trial that
    trains in its own process, or a plain PyTorch script (the benchmarks' baseline).

    ``report(metrics, checkpoint=...)`` is called by every rank once per epoch (a barrier
    under DDP); ``checkpoint_cls.from_directory(folder)`` wraps what rank 0 saved;
    ``get_checkpoint()`` returns the checkpoint to resume from, or None.
    """

    rank: int
    world: int
    report: Any
    get_checkpoint: Any
    checkpoint_cls: Any
    prepare_model: Any
    device: Any


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DDP over the workers, a checkpoint and a report per
    epoch, resuming from the last checkpoint after a failure. ``config`` is Ray Train's
    ``train_loop_config``: the ``LoopConfig``, the ``Hyperparameters`` and the data reference."""
    started = time.perf_counter()
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    session = Session(context.get_world_rank(), context.get_world_size(), ray.train.report,
                      ray.train.get_checkpoint, ray.train.Checkpoint,
                      ray.train.torch.prepare_model,  # DDP when world > 1 (gloo on CPUs, nccl on GPUs)
                      ray.train.torch.get_device())
    loop: LoopConfig = config["loop"]
    if session.rank == 0 and loop.pg_file:
        # Record this attempt's placement group so the Tune driver can free it (see _reaper).
        group = ray.util.get_current_placement_group()
        if group is not None:
            with open(loop.pg_file, "a") as handle:
                handle.write(group.id.hex() + "\n")
    fit_epochs(loop, config["hyperparameters"], ray.get(config["data_ref"]), session, started)


def _in_process_trial(config: dict[str, Any], loop: LoopConfig, data: dict[str, Any]) -> None:
    """A Tune trial that trains in its own (reused) actor process: one worker, no Ray Train
    controller or worker group to start, so a trial begins its first epoch within a second.
    Tune restores it from its last checkpoint after a failure (``max_failures``). ``config``
    is the trial's sample of the search space; ``data`` the arrays (``tune.with_parameters``
    resolved the object reference: zero-copy numpy views of the object store)."""
    started = time.perf_counter()
    import torch
    from ray import tune

    hyperparameters = Hyperparameters.model_validate({k: config[k] for k in HYPERPARAMETERS})
    device = torch.device("cuda" if loop.training.use_gpu and torch.cuda.is_available() else "cpu")
    session = Session(0, 1, tune.report, tune.get_checkpoint, tune.Checkpoint,
                      lambda model: model.to(device), device)
    fit_epochs(loop, hyperparameters, data, session, started)


def fit_epochs(loop: LoopConfig, hyperparameters: Hyperparameters, data: dict[str, Any], session: Session,
               started: float) -> None:
    """The epoch loop: Ray Train workers, in-process Tune trials and the plain PyTorch baseline
    of ``benchmarks/training.py`` all run this. ``data`` holds the train and validation arrays
    (and ``wide_init``); ``started`` is when the caller began, for the start-up figure."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from core.model import ModelSpec, TabularNet

    rank, world = session.rank, session.world
    hp = hyperparameters
    torch.set_num_threads(loop.threads_per_worker)
    spec = ModelSpec(**loop.data_spec, **hp.architecture())
    seed = loop.training.seed
    _seed_everything(seed)
    model: Any = TabularNet(spec)  # a DDP wrapper after prepare_model
    if spec.wide and data.get("wide_init"):
        model.load_wide(**data["wide_init"])
    model = session.prepare_model(model)
    device = session.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss() if spec.task == "classification" else torch.nn.MSELoss()

    categorical, numeric, target = data["train"]
    dataset = TensorDataset(torch.as_tensor(categorical, dtype=torch.long),
                            torch.as_tensor(numeric, dtype=torch.float32),
                            torch.as_tensor(target, dtype=torch.float32))
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                     seed=seed)
    loader = DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler)

    start_epoch = 0
    checkpoint = session.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True, map_location=device)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1

    startup_s = time.perf_counter() - started
    first_epoch_at = time.time()  # wall clock: the driver compares it with the trial's start
    for epoch in range(start_epoch, loop.epochs):
        _maybe_fail(loop.training.fault, epoch, rank, world)
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
                   **_val_metrics(model, data["validation"], spec.task),
                   # Start-up inside the process (from its function's start to its first
                   # epoch), and when the first epoch began, for the driver's measure of the
                   # whole trial start-up (scheduling, process and group start included).
                   "startup_s": startup_s if epoch == start_epoch else 0.0,
                   "first_epoch_at": first_epoch_at if epoch == start_epoch else 0.0}
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch}, Path(folder) / CHECKPOINT_FILE)
                saved = session.checkpoint_cls.from_directory(folder)
            session.report(metrics, checkpoint=saved)  # every rank reports (a barrier)


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def _maybe_fail(fault: FaultInjection | None, epoch: int, rank: int, world: int) -> None:
    """Fault injection for tests: the last worker dies once at ``fault.at_epoch``."""
    if fault and epoch == fault.at_epoch and rank == world - 1 and not os.path.exists(fault.marker):
        Path(fault.marker).write_text(str(time.time()))
        # Let the controller commit the previous epoch's report first (it polls every ~2 s).
        time.sleep(fault.delay_s)
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


def fit(loop: LoopConfig, hyperparameters: Hyperparameters, data_ref: Any, storage_path: str, name: str,
        callbacks: list | None = None) -> FitResult:
    """One Ray Train fit of ``loop.training.num_workers`` workers (DDP when more than one),
    used directly (``--reproduce``) and by each multi-worker Tune trial."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from compute.ddp import LoopbackTorchConfig

    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop, "hyperparameters": hyperparameters, "data_ref": data_ref},
        torch_config=LoopbackTorchConfig(),
        scaling_config=ScalingConfig(num_workers=loop.training.num_workers, use_gpu=loop.training.use_gpu),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=loop.training.max_failures),
                             callbacks=callbacks or []),
    )
    result = trainer.fit()
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    return FitResult(dict(result.metrics or {}), history,
                     result.checkpoint.path if result.checkpoint else None,
                     str(result.error) if result.error else None)


def _trial(config: dict[str, Any], loop: LoopConfig, data_refs: list[Any], storage_path: str) -> None:
    """A Tune trial: fit a TorchTrainer (DDP group) with this trial's hyperparameters. The data
    reference comes in a list so that ``tune.with_parameters`` passes it on unresolved: the
    Train workers read the arrays, not this process."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    hyperparameters = Hyperparameters.model_validate({k: config[k] for k in HYPERPARAMETERS})
    loop = loop.model_copy(update={"pg_file": str(Path(storage_path) / f"pg_{trial_id}")})
    fit(loop, hyperparameters, data_refs[0], storage_path, name=f"trial_{trial_id}",
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
        """Logs each epoch and each trial's start-up: from Tune starting the trial to its
        first epoch beginning (process or worker-group start, data and model set-up)."""

        def __init__(self) -> None:
            self.started: dict[str, float] = {}
            self.startup_s: dict[str, float] = {}

        def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001, ANN003
            self.started[trial.trial_id] = time.time()

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001, ANN003
            shown = {k: round(float(result[k]), 4) for k in EPOCH_METRICS if k in result}
            if result.get("first_epoch_at") and trial.trial_id in self.started \
                    and trial.trial_id not in self.startup_s:
                self.startup_s[trial.trial_id] = float(result["first_epoch_at"]) - self.started[trial.trial_id]
                log.info("trial %s: first epoch began %.2fs after Tune started the trial (%.2fs of it "
                         "inside the trial process)", trial.trial_id, self.startup_s[trial.trial_id],
                         float(result.get("startup_s") or 0.0))
            log.info("trial %s epoch %s: %s", trial.trial_id, result.get("epoch"), shown)

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001, ANN003
            log.info("trial %s finished after %s epochs", trial.trial_id,
                     (trial.last_result or {}).get("training_iteration"))

    return Progress()


@dataclass
class TrialOutcome:
    trial_id: str
    hyperparameters: Hyperparameters
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
    # Per trial, in start order: Tune starting it -> its first epoch beginning.
    startup_s: list[float] = field(default_factory=list)

    @property
    def epochs_trained(self) -> int:
        return int(self.best_epoch["epoch"]) + 1


def search_space(space: Any) -> dict[str, Any]:
    """Ray Tune's search space from the settings' ``SearchSpace``: one entry per hyperparameter."""
    from ray import tune

    sampled = {
        "lr": tune.loguniform(*space.lr),
        "width": tune.choice(space.width),
        "depth": tune.choice(space.depth),
        "dropout": tune.choice(space.dropout),
        "embedding_dim": tune.choice(space.embedding_dim),
        "batch_size": tune.choice(space.batch_size),
        "weight_decay": tune.loguniform(*space.weight_decay),
    }
    if tuple(sampled) != HYPERPARAMETERS:
        raise RuntimeError(f"the search space {tuple(sampled)} does not match Hyperparameters {HYPERPARAMETERS}")
    return sampled


def tune_model(training: TrainingConfig, data_spec: dict[str, Any], data_ref: Any, space: dict[str, Any],
               storage_path: str, name: str, metric: str = SELECTION_METRIC) -> TuneOutcome:
    """Ray Tune (``training.scheduler``: ASHA or FIFO) over ``training.trials`` samples of
    ``space``. ``data_ref``: the train and validation arrays in the object store (``share``)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    started = time.perf_counter()
    workers = training.num_workers
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrent = max(1, cpus // workers)
    train_storage = str(Path(storage_path) / name / "train")
    Path(train_storage).mkdir(parents=True, exist_ok=True)
    loop = LoopConfig(training=training, data_spec=data_spec, epochs=training.max_epochs,
                      threads_per_worker=max(1, cpus // (workers * concurrent)))
    in_process = workers == 1
    if in_process:
        # One worker: the trial trains in its own process, holding the CPUs it computes on;
        # actors are reused between trials, so only the first trial pays for a process.
        trainable = tune.with_resources(tune.with_parameters(_in_process_trial, loop=loop, data=data_ref),
                                        {"cpu": loop.threads_per_worker, "gpu": 1 if training.use_gpu else 0})
    else:
        # Several workers: each trial fits a Ray Train DDP worker group; the trial itself
        # holds no CPU so its workers can have them.
        trainable = tune.with_resources(tune.with_parameters(_trial, loop=loop, data_refs=[data_ref],
                                                             storage_path=train_storage), {"cpu": 0, "memory": 1})
    max_epochs = training.max_epochs
    chosen = (ASHAScheduler(time_attr="training_iteration", max_t=max_epochs,
                            grace_period=min(training.grace_period, max_epochs))
              if training.scheduler == "asha" else FIFOScheduler())
    progress = _progress()
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        # The seeded generator carries the concurrency limit itself: Tune ignores
        # max_concurrent_trials when a search algorithm is given.
        tune_config=tune.TuneConfig(metric=metric, mode="min", num_samples=training.trials, scheduler=chosen,
                                    search_alg=BasicVariantGenerator(random_state=training.seed,
                                                                     max_concurrent=concurrent),
                                    reuse_actors=in_process),
        run_config=tune.RunConfig(
            name=name, storage_path=str(Path(storage_path)),
            callbacks=[progress] if in_process else [_reaper(train_storage), progress],
            failure_config=tune.FailureConfig(max_failures=training.max_failures if in_process else 0),
            verbose=0),
    )
    trials = training.trials
    scheduler = training.scheduler
    log.info("tuning: %d trials, %d at a time, up to %d epochs (%s), %s", trials, concurrent, max_epochs,
             scheduler, "each trial training in its own reused process" if in_process
             else f"each trial a Ray Train group of {workers} DDP workers")
    grid = tuner.fit()
    outcomes = []
    for index in range(len(grid)):
        result = grid[index]
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        if in_process:
            # Tune kept every epoch's checkpoint; Ray Train's report callback names them in the
            # metrics instead, so give in-process trials the same column.
            saved = {int(m["epoch"]): c.path for c, m in (result.best_checkpoints or []) if "epoch" in m}
            for row in history:
                row["checkpoint_path"] = saved.get(int(row["epoch"]))
        sampled = result.config or {}
        hyperparameters = Hyperparameters.model_validate({k: _plain_value(sampled[k]) for k in HYPERPARAMETERS})
        outcomes.append(TrialOutcome(
            trial_id=str((result.metrics or {}).get("trial_id", result.path.rsplit("_", 1)[-1])),
            hyperparameters=hyperparameters, history=[_plain(h) for h in history],
            checkpoint_path=(history[-1].get("checkpoint_path") if history and in_process
                             else (result.metrics or {}).get("checkpoint_path")),
            error=str(result.error) if result.error else None))
    finished = [o for o in outcomes if o.best_epoch(metric)]
    if not finished:
        errors = "; ".join(o.error or "no epochs" for o in outcomes)
        raise RuntimeError(f"no Tune trial finished an epoch: {errors}")
    # Model selection over every trial's every epoch: the checkpoint with the best validation
    # metric (early stopping), not only each trial's last epoch.
    best = min(finished, key=lambda o: o.best_epoch(metric)[metric])
    startups = [progress.startup_s[t] for t in sorted(progress.startup_s)]
    if startups:
        # The first `concurrent` trials start fresh processes; the rest reuse them.
        log.info("trial start-up: %s s (median after the first %d trial(s) at once: %s s)",
                 [round(x, 2) for x in startups], concurrent,
                 round(statistics.median(startups[concurrent:]), 2) if len(startups) > concurrent else "n/a")
    return TuneOutcome(best, best.best_epoch(metric), outcomes, time.perf_counter() - started,
                       str(Path(storage_path) / name), trial_epochs=sum(len(o.history) for o in outcomes),
                       startup_s=startups)


def _plain_value(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("epoch", *EPOCH_METRICS, "training_iteration", "time_total_s", "checkpoint_path", "startup_s",
            "first_epoch_at")
    return {k: (float(v) if isinstance(v, np.floating | float) else int(v) if isinstance(v, np.integer) else v)
            for k, v in row.items() if k in keep}


def load_checkpoint_state(checkpoint_path: str) -> dict[str, Any]:
    """The model state dict saved by the train loop (tensors only, loaded weights-only)."""
    import torch

    return torch.load(Path(checkpoint_path) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")["model"]
