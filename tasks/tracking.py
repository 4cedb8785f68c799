"""MLflow tracking: one parent run per flow run, one child run per Tune trial.

Trial metrics are logged from the driver after tuning (from Tune's per-epoch history) rather
than from inside Ray workers, so a resumed worker never logs an epoch twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.training import EPOCH_METRICS

log = logging.getLogger(__name__)


def configure_mlflow(tracking_uri: str, artifact_root: str, experiment: str) -> str:
    """Point MLflow at the tracking store and get (or create) the experiment; returns its id."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:"):
        Path(artifact_root).mkdir(parents=True, exist_ok=True)
        location = Path(artifact_root).resolve().as_uri()
    return mlflow.create_experiment(experiment, artifact_location=location)


def _process_tags() -> dict[str, str]:
    """Which process owns a run: host, PID and the PID's start time (PIDs are reused)."""
    import socket

    import psutil

    return {"flywheel.host": socket.gethostname(), "flywheel.pid": str(os.getpid()),
            "flywheel.pid_started": repr(psutil.Process().create_time())}


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Runs of this host left RUNNING by a process that is gone (a SIGKILL, a power cut): ended
    KILLED, with a tag saying when it was found. Runs of other hosts, and runs whose process
    still runs, are left alone. Returns the ended run ids."""
    import socket

    from mlflow import MlflowClient

    from core.lifetime import same_process

    client = MlflowClient()
    host = socket.gethostname().replace("'", "")
    found = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                               f"tags.`flywheel.host` = '{host}'", max_results=1000)
    ended = []
    for run in found:
        pid, started = run.data.tags.get("flywheel.pid", ""), run.data.tags.get("flywheel.pid_started", "")
        try:
            if pid.isdigit() and same_process(int(pid), float(started)) is not None:
                continue
        except ValueError:  # no start time recorded: not ours to judge alive
            pass
        client.set_tag(run.info.run_id, "flywheel.ended", f"process {pid} was gone when the next run started "
                       f"({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


@contextmanager
def parent_run(experiment_id: str, run_name: str, tags: dict[str, str]) -> Iterator[Any]:
    """The flow run's MLflow run: FINISHED on success, FAILED (or KILLED) otherwise. A run a
    killed process left RUNNING is ended KILLED first (``end_orphaned_runs``)."""
    import mlflow

    for run_id in end_orphaned_runs(experiment_id):
        log.warning("MLflow run %s was left RUNNING by a process that is gone: ended KILLED", run_id)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags={**tags, **_process_tags()})
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)


def log_trials(experiment_id: str, parent_run_id: str, trials: list[Any], best_trial_id: str) -> None:
    """A child run per trial: its family, hyperparameters and per-iteration metrics."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient()
    for trial in trials:
        child = client.create_run(experiment_id, run_name=f"trial-{trial.trial_id}", tags={
            "mlflow.parentRunId": parent_run_id, "flywheel.trial_id": trial.trial_id, "flywheel.family": trial.family,
            "flywheel.best_trial": str(trial.trial_id == best_trial_id).lower()})
        metrics = [Metric(key, float(row[key]), 0, int(row["epoch"]))
                   for row in trial.history for key in EPOCH_METRICS
                   if key in row and row[key] == row[key]]
        client.log_batch(child.info.run_id, metrics=metrics,
                         params=[Param("family", trial.family),
                                 *(Param(k, str(v)) for k, v in trial.hyperparameters.items())],
                         tags=[RunTag("flywheel.epochs_run", str(len(trial.history)))])
        client.set_terminated(child.info.run_id, "FAILED" if trial.error else "FINISHED")


def log_training(run_id: str, params: dict[str, Any], evaluation: Any, picture: Path, model_dir: Path,
                 leaderboard: list[dict[str, Any]]) -> None:
    """Everything a training run records in its MLflow run: parameters, every model's test
    metrics (the winner ``test_*``, each family's best ``<family>_test_*`` and its validation
    loss, the prior and the champion ``<name>_test_*``), the winning family and its lead (tags),
    the evaluation picture, the winner's model folder and the trial leaderboard. Logged by run
    id, so it works from any thread."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(f"test_{k}", float(v), now, 0) for k, v in evaluation.candidate.metrics.items()]
    for standing in evaluation.families:
        prefix = _metric_name(standing.family)
        metrics += [Metric(f"{prefix}_test_{k}", float(v), now, 0) for k, v in standing.scored.metrics.items()]
        metrics.append(Metric(f"{prefix}_val_loss", float(standing.val_loss), now, 0))
    for other in [*evaluation.baselines, *([evaluation.champion] if evaluation.champion else [])]:
        prefix = other.name.split()[0]
        metrics += [Metric(f"{prefix}_test_{k}", float(v), now, 0) for k, v in other.metrics.items()]
    tags = [RunTag("flywheel.family", evaluation.family),
            RunTag("flywheel.competition", evaluation.decision.reasons[0])]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()], tags=tags)
    client.log_artifact(run_id, str(picture), "evaluation")
    client.log_artifacts(run_id, str(model_dir), "model")
    client.log_dict(run_id, {"trials": leaderboard}, "leaderboard.json")


def _metric_name(family: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in family)


def log_reproduction(run_id: str, metrics: dict[str, float], differences: dict[str, float]) -> None:
    """A ``--reproduce`` run's test metrics and their absolute differences from the original's."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[
        *(Metric(f"test_{k}", float(v), now, 0) for k, v in metrics.items()),
        *(Metric(f"abs_diff_{k}", float(v), now, 0) for k, v in differences.items())])


# Tracking-server writes are retried: a busy SQLite file or a restarting server passes.
log_trials_task = task(name="log trials to MLflow", retries=2, retry_delay_seconds=2,
                       cache_policy=NO_CACHE)(log_trials)
log_training_task = task(name="log training to MLflow", retries=2, retry_delay_seconds=2,
                         cache_policy=NO_CACHE)(log_training)
log_reproduction_task = task(name="log reproduction to MLflow", retries=2, retry_delay_seconds=2,
                             cache_policy=NO_CACHE)(log_reproduction)
