"""Training on Ray: every model family's fit in Tune trials or Ray Train worker groups, and one
Ray Tune competition (ASHA per family) over all of them.

Tune trials run one of two ways, with the same family ``fit``, checkpoints and reports:
- one worker (``num_workers: 1``): the trial fits in its own actor process, which Tune reuses
  for the next trial (``reuse_actors``). No Train controller or worker group is started, so
  after the first trial a trial's start-up is well under a second; Tune restores a failed
  trial from its last checkpoint (``max_failures``).
- several workers, for families that distribute: Train V2 refuses ``Tuner(Trainer(...))``, so
  each trial is a plain function that builds and fits a Ray Train ``TorchTrainer`` (DDP, the
  network) or ``LightGBMTrainer`` (data-parallel trees) and reports back through
  ``TuneReportCallback``. The trial function holds no CPU (``{"cpu": 0, "memory": 1}``) so that
  its Train workers can have them. A family that does not distribute (``linear``, most of a
  user's own) still trains in one process.
Trials run ``CPUs // num_workers`` at a time, so 2 CPUs never deadlock.

The competition: every configured family gets its own sampled configurations (seeded, so the
same settings give the same trials) and its own ASHA brackets (an epoch of the network and a
block of boosting rounds are not the same unit, so a family's trials are only compared with
each other when stopping early). The winner is the best validation loss over every family's
every reported checkpoint.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.families import FitData, resolve, sample
from core.training import (
    EPOCH_METRICS,
    SELECTION_METRIC,
    FaultInjection,
    LoopConfig,
    TrainingConfig,
)

log = logging.getLogger(__name__)

# How long after a Ray Train trial ended its placement group is freed (see _reaper): by then
# its controller, killed with the trial's actor, is gone.
REAP_GRACE_S = 5.0

os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the flow, not only Tune


# --------------------------------------------------------------------------- worker side
@dataclass
class Session:
    """A ``core.families.FitSession`` over Ray: Tune's or Ray Train's report and checkpoint
    calls (``report_fn``, ``get_checkpoint``, ``checkpoint_cls``), plus what the network's DDP
    needs (``prepare_model``, ``device``) and LightGBM's network parameters."""

    rank: int
    world: int
    iterations: int
    threads: int
    seed: int
    report_fn: Any
    get_checkpoint: Any
    checkpoint_cls: Any
    fault: FaultInjection | None = None
    prepare_model: Any = None
    device: Any = None
    lightgbm_params: dict[str, Any] | None = None

    def report(self, metrics: dict[str, float], folder: Path | None) -> None:
        saved = self.checkpoint_cls.from_directory(str(folder)) if folder is not None else None
        self.report_fn(metrics, checkpoint=saved)

    def resume_from(self) -> Path | None:
        checkpoint = self.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint else None

    def before_iteration(self, iteration: int) -> None:
        _maybe_fail(self.fault, iteration, self.rank, self.world)


def _fit_data(loop: LoopConfig, payload: dict[str, Any]) -> FitData:
    return FitData.from_payload(loop.data_spec, payload)


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the family's fit over the worker group (DDP for the
    network, LightGBM's data-parallel learner for trees), a checkpoint and a report per
    iteration, resuming from the last checkpoint after a failure. ``config`` is Ray Train's
    ``train_loop_config``: the ``LoopConfig``, the family, its hyperparameters and the data
    reference."""
    import ray.train

    context = ray.train.get_context()
    loop: LoopConfig = config["loop"]
    family = resolve(config["family"])
    session = Session(context.get_world_rank(), context.get_world_size(), loop.epochs, loop.threads_per_worker,
                      loop.training.seed, ray.train.report, ray.train.get_checkpoint, ray.train.Checkpoint,
                      loop.training.fault)
    if family.distributed == "torch":
        import ray.train.torch

        session.prepare_model = ray.train.torch.prepare_model  # DDP when world > 1 (gloo on CPUs)
        session.device = ray.train.torch.get_device()
    elif family.distributed == "lightgbm":
        import ray.train.lightgbm

        session.lightgbm_params = ray.train.lightgbm.get_network_params()
    if session.rank == 0 and loop.pg_file:
        # Record this attempt's placement group so the Tune driver can free it (see _reaper).
        group = ray.util.get_current_placement_group()
        if group is not None:
            with open(loop.pg_file, "a") as handle:
                handle.write(group.id.hex() + "\n")
    family.fit(_fit_data(loop, ray.get(config["data_ref"])), config["hyperparameters"], session)


def _in_process_trial(config: dict[str, Any], loop: LoopConfig, data: dict[str, Any]) -> None:
    """A Tune trial that fits in its own (reused) actor process: one worker, no Ray Train
    controller or worker group to start, so a trial begins within a second. Tune restores it
    from its last checkpoint after a failure (``max_failures``). ``config`` is the trial's
    configuration (family and hyperparameters); ``data`` the arrays (``tune.with_parameters``
    resolved the object reference: zero-copy numpy views of the object store)."""
    from ray import tune

    trial = config["trial"]
    family = resolve(trial["family"])
    session = Session(0, 1, loop.epochs, loop.threads_per_worker, loop.training.seed, tune.report,
                      tune.get_checkpoint, tune.Checkpoint, loop.training.fault)
    if family.distributed == "torch":
        import torch

        device = torch.device("cuda" if loop.training.use_gpu and torch.cuda.is_available() else "cpu")
        session.prepare_model, session.device = (lambda model: model.to(device)), device
    family.fit(_fit_data(loop, data), trial["hyperparameters"], session)


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


def fit(loop: LoopConfig, family: str, hyperparameters: dict[str, Any], data_ref: Any, storage_path: str,
        name: str, callbacks: list | None = None) -> FitResult:
    """One Ray Train fit of a family over ``loop.training.num_workers`` workers: a
    ``TorchTrainer`` (DDP when more than one) for the network, a ``LightGBMTrainer`` for trees;
    used by each multi-worker Tune trial and by the benchmarks."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    kind = resolve(family).distributed
    common: dict[str, Any] = {
        "train_loop_config": {"loop": loop, "family": family, "hyperparameters": hyperparameters,
                              "data_ref": data_ref},
        "scaling_config": ScalingConfig(num_workers=loop.training.num_workers, use_gpu=loop.training.use_gpu),
        "run_config": RunConfig(name=name, storage_path=storage_path,
                                failure_config=FailureConfig(max_failures=loop.training.max_failures),
                                callbacks=callbacks or []),
    }
    trainer: Any
    if kind == "torch":
        from ray.train.torch import TorchTrainer

        from compute.ddp import LoopbackTorchConfig

        trainer = TorchTrainer(train_loop, torch_config=LoopbackTorchConfig(), **common)
    elif kind == "lightgbm":
        from ray.train.lightgbm import LightGBMTrainer

        trainer = LightGBMTrainer(train_loop, **common)
    else:
        raise ValueError(f"model family {family!r} does not train on a Ray Train worker group")
    result = trainer.fit()
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
    return FitResult(dict(result.metrics or {}), history,
                     result.checkpoint.path if result.checkpoint else None,
                     str(result.error) if result.error else None)


def _trial(config: dict[str, Any], loop: LoopConfig, data_refs: list[Any], storage_path: str) -> None:
    """A Tune trial: fit a Ray Train worker group with this trial's family and hyperparameters.
    The data reference comes in a list so that ``tune.with_parameters`` passes it on
    unresolved: the Train workers read the arrays, not this process."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = config["trial"]
    trial_id = tune.get_context().get_trial_id()
    loop = loop.model_copy(update={"pg_file": str(Path(storage_path) / f"pg_{trial_id}")})
    fit(loop, trial["family"], trial["hyperparameters"], data_refs[0], storage_path, name=f"trial_{trial_id}",
        callbacks=[TuneReportCallback()])


def _reaper(storage_path: str, grace_s: float = REAP_GRACE_S) -> Any:
    """Tune callback that frees a stopped trial's Train placement group.

    When Tune stops a trial (ASHA) it kills the trial actor, and with it the Train controller,
    before the controller releases its workers' placement group; without Ray's dashboard (state
    API) nothing reclaims it and the next trial waits forever for CPUs. The group is removed
    ``grace_s`` after the trial ended: removed while the controller still lived, its workers
    would die under it and the controller would retry on a new group that nothing records.
    """
    from ray import tune

    class PlacementGroupReaper(tune.Callback):
        def __init__(self) -> None:
            self.due: dict[str, float] = {}  # trial id -> when to free its groups

        def _reap(self, trial_id: str) -> None:
            from ray._raylet import PlacementGroupID
            from ray.util import placement_group_table, remove_placement_group
            from ray.util.placement_group import PlacementGroup

            record = Path(storage_path) / f"pg_{trial_id}"
            if not record.exists():
                return
            for hex_id in set(record.read_text().split()):
                state = placement_group_table().get(hex_id, {}).get("state")
                if state and state != "REMOVED":
                    remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id))))

        def _ended(self, trial: Any) -> None:
            self.due[trial.trial_id] = time.monotonic() + grace_s

        def on_step_begin(self, iteration, trials, **info):  # noqa: ANN001, ANN003
            now = time.monotonic()
            for trial_id in [t for t, at in self.due.items() if at <= now]:
                del self.due[trial_id]
                self._reap(trial_id)

        def on_experiment_end(self, trials, **info):  # noqa: ANN001, ANN003
            for trial_id in list(self.due):
                del self.due[trial_id]
                self._reap(trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001, ANN003
            self._ended(trial)

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001, ANN003
            self._ended(trial)

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
            log.info("trial %s (%s) iteration %s: %s", trial.trial_id, trial.config["trial"]["family"],
                     result.get("epoch"), shown)

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001, ANN003
            log.info("trial %s (%s) finished after %s iterations", trial.trial_id, trial.config["trial"]["family"],
                     (trial.last_result or {}).get("training_iteration"))

    return Progress()


@dataclass
class FamilyPlan:
    """One family's part of a competition: its name or dotted path and the hyperparameters of
    each of its trials (sampled by ``plan``)."""

    family: str
    configs: list[dict[str, Any]]


def plan(families: list[tuple[str, dict[str, Any], int]], seed: int) -> list[FamilyPlan]:
    """Each family's trials, sampled from its space with a generator seeded by ``seed`` and the
    family's position: the same settings give the same trials, whatever order Tune runs them in.
    ``families``: (name or dotted path, space, trials)."""
    plans = []
    for index, (name, space, trials) in enumerate(families):
        family = resolve(name)
        rng = np.random.default_rng([seed, index])
        configs: list[dict[str, Any]] = []
        for _ in range(trials):
            config = family.validate(sample(space, rng))
            if config not in configs:  # a small space: no trial twice
                configs.append(config)
        plans.append(FamilyPlan(name, configs))
    return plans


def _family_scheduler(training: TrainingConfig, metric: str) -> Any:
    """ASHA brackets per family (FIFO when ``training.scheduler`` says so): a family's trials
    are stopped early only against each other, since their iterations differ in kind."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if training.scheduler != "asha":
        return FIFOScheduler()
    max_t = training.max_epochs

    class PerFamilyASHA(FIFOScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.by_family: dict[str, Any] = {}

        def _of(self, trial: Any) -> Any:
            family = trial.config["trial"]["family"]
            if family not in self.by_family:
                self.by_family[family] = ASHAScheduler(time_attr="training_iteration", metric=metric, mode="min",
                                                       max_t=max_t, grace_period=min(training.grace_period, max_t))
            return self.by_family[family]

        def set_search_properties(self, metric, mode, **spec):  # noqa: ANN001, ANN003, ANN201
            return True

        def on_trial_add(self, tune_controller, trial):  # noqa: ANN001, ANN201
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):  # noqa: ANN001, ANN201
            decision = self._of(trial).on_trial_result(tune_controller, trial, result)
            if decision == self.STOP and result.get("training_iteration", 0) >= max_t:
                # Its last iteration: the trial ends by itself. Stopped here, a Ray Train trial
                # would be killed while its controller is still releasing its workers.
                return self.CONTINUE
            return decision

        def on_trial_complete(self, tune_controller, trial, result):  # noqa: ANN001, ANN201
            self._of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):  # noqa: ANN001, ANN201
            self._of(trial).on_trial_remove(tune_controller, trial)

        def debug_string(self) -> str:
            return "ASHA per family: " + ", ".join(f"{k}: {v.debug_string()}" for k, v in self.by_family.items())

    return PerFamilyASHA()


@dataclass
class TrialOutcome:
    trial_id: str
    family: str
    hyperparameters: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint_path: str | None
    error: str | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def best_epoch(self, metric: str) -> dict[str, Any]:
        """The iteration with the best validation metric (early stopping picks its checkpoint)."""
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
    metric: str = SELECTION_METRIC

    @property
    def epochs_trained(self) -> int:
        return int(self.best_epoch["epoch"]) + 1

    def family_losses(self) -> dict[str, float]:
        """Each family's best validation loss, the winner's family first."""
        return {family: trial.best_epoch(self.metric)[self.metric] for family, trial in self.best_by_family().items()}

    def best_by_family(self) -> dict[str, TrialOutcome]:
        """Each family's best trial (by its best checkpoint), the winner's family first."""
        out: dict[str, TrialOutcome] = {self.best.family: self.best}
        for trial in sorted((t for t in self.trials if t.best_epoch(self.metric)),
                            key=lambda t: t.best_epoch(self.metric)[self.metric]):
            out.setdefault(trial.family, trial)
        return out


def tune_model(training: TrainingConfig, data_spec: dict[str, Any], data_ref: Any, plans: list[FamilyPlan],
               storage_path: str, name: str, metric: str = SELECTION_METRIC) -> TuneOutcome:
    """One Ray Tune run over every family's trials (``training.scheduler``: ASHA per family, or
    FIFO). ``data_ref``: the train and validation arrays in the object store (``share``)."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    started = time.perf_counter()
    workers = training.num_workers
    cpus = int(ray.cluster_resources().get("CPU", 1))
    concurrent = max(1, cpus // workers)
    train_storage = str(Path(storage_path) / name / "train")
    Path(train_storage).mkdir(parents=True, exist_ok=True)
    loop = LoopConfig(training=training, data_spec=data_spec, epochs=training.max_epochs,
                      threads_per_worker=max(1, cpus // (workers * concurrent)))
    trials = [{"family": p.family, "hyperparameters": c} for p in plans for c in p.configs]
    if not trials:
        raise ValueError("no trials: train.families lists no family, or every family has 0 trials")
    distributed = {p.family for p in plans if resolve(p.family).distributed}
    in_process = workers == 1 or not distributed
    if workers > 1 and len(distributed) < len(plans):
        log.info("families %s train in one process each: they do not distribute over Ray Train workers",
                 sorted({p.family for p in plans} - distributed))
    if in_process:
        # One worker: the trial trains in its own process, holding the CPUs it computes on;
        # actors are reused between trials, so only the first trial pays for a process.
        trainable = tune.with_resources(tune.with_parameters(_in_process_trial, loop=loop, data=data_ref),
                                        {"cpu": loop.threads_per_worker, "gpu": 1 if training.use_gpu else 0})
    else:
        # Several workers: each trial fits a Ray Train worker group (the trial itself holds no
        # CPU so its workers can have them); a family that does not distribute trains in one.
        def mixed(config: dict[str, Any], loop: LoopConfig, data_refs: list[Any], storage_path: str) -> None:
            if resolve(config["trial"]["family"]).distributed:
                _trial(config, loop, data_refs, storage_path)
            else:
                import ray as _ray

                _in_process_trial(config, loop.model_copy(update={"threads_per_worker": 1}), _ray.get(data_refs[0]))

        trainable = tune.with_resources(tune.with_parameters(mixed, loop=loop, data_refs=[data_ref],
                                                             storage_path=train_storage), {"cpu": 0, "memory": 1})
    progress = _progress()
    tuner = tune.Tuner(
        trainable,
        # Every trial's configuration is fixed up front (``plan``): Tune runs each once.
        param_space={"trial": tune.grid_search(trials)},
        # The generator carries the concurrency limit itself: Tune ignores
        # max_concurrent_trials when a search algorithm is given.
        tune_config=tune.TuneConfig(metric=metric, mode="min", num_samples=1,
                                    scheduler=_family_scheduler(training, metric),
                                    search_alg=BasicVariantGenerator(random_state=training.seed,
                                                                     max_concurrent=concurrent),
                                    reuse_actors=in_process),
        run_config=tune.RunConfig(
            name=name, storage_path=str(Path(storage_path)),
            callbacks=[progress] if in_process else [_reaper(train_storage), progress],
            failure_config=tune.FailureConfig(max_failures=training.max_failures if in_process else 0),
            verbose=0),
    )
    log.info("tuning: %d trials (%s), %d at a time, up to %d iterations each (%s), %s", len(trials),
             ", ".join(f"{p.family}: {len(p.configs)}" for p in plans), concurrent, training.max_epochs,
             training.scheduler, "each trial training in its own reused process" if in_process
             else f"each trial a Ray Train group of {workers} workers")
    grid = tuner.fit()
    outcomes = []
    for index in range(len(grid)):
        result = grid[index]
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        trial = (result.config or {})["trial"]
        if in_process or not resolve(trial["family"]).distributed:
            # Tune kept every epoch's checkpoint; Ray Train's report callback names them in the
            # metrics instead, so give in-process trials the same column.
            saved = {int(m["epoch"]): c.path for c, m in (result.best_checkpoints or []) if "epoch" in m}
            for row in history:
                row["checkpoint_path"] = saved.get(int(row["epoch"]))
        outcomes.append(TrialOutcome(
            trial_id=str((result.metrics or {}).get("trial_id", result.path.rsplit("_", 1)[-1])),
            family=trial["family"], hyperparameters=dict(trial["hyperparameters"]),
            history=[_plain(h) for h in history],
            checkpoint_path=(history[-1].get("checkpoint_path") if history else None),
            error=str(result.error) if result.error else None))
    finished = [o for o in outcomes if o.best_epoch(metric)]
    if not finished:
        errors = "; ".join(o.error or "no epochs" for o in outcomes)
        raise RuntimeError(f"no Tune trial finished an iteration: {errors}")
    best = select(finished, [p.family for p in plans], metric, training.selection_tolerance)
    startups = [progress.startup_s[t] for t in sorted(progress.startup_s)]
    if startups:
        # The first `concurrent` trials start fresh processes; the rest reuse them.
        log.info("trial start-up: %s s (median after the first %d trial(s) at once: %s s)",
                 [round(x, 2) for x in startups], concurrent,
                 round(statistics.median(startups[concurrent:]), 2) if len(startups) > concurrent else "n/a")
    return TuneOutcome(best, best.best_epoch(metric), outcomes, time.perf_counter() - started,
                       str(Path(storage_path) / name), trial_epochs=sum(len(o.history) for o in outcomes),
                       startup_s=startups, metric=metric)


def select(finished: list[TrialOutcome], preference: list[str], metric: str, tolerance: float) -> TrialOutcome:
    """The winner: model selection over every family's every trial's every iteration, by the
    checkpoint with the best validation metric (early stopping), not only each trial's last.
    A family earlier in ``preference`` (the settings' order: the cheaper to serve first) wins
    when its best is within ``tolerance`` (relative) of the overall best: a near tie is noise,
    and the simpler model is the better bet."""
    def loss(trial: TrialOutcome) -> float:
        return float(trial.best_epoch(metric)[metric])

    overall = min(finished, key=loss)
    bound = loss(overall) + tolerance * abs(loss(overall))
    rank = {family: i for i, family in enumerate(preference)}
    within = [t for t in finished if loss(t) <= bound]
    first = min(rank.get(t.family, len(rank)) for t in within)
    return min((t for t in within if rank.get(t.family, len(rank)) == first), key=loss)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("epoch", *EPOCH_METRICS, "training_iteration", "time_total_s", "checkpoint_path", "startup_s",
            "first_epoch_at", "rounds")
    return {k: (float(v) if isinstance(v, np.floating | float) else int(v) if isinstance(v, np.integer) else v)
            for k, v in row.items() if k in keep}
