"""Train: features -> a Ray Tune competition of model families -> evaluation -> MLflow registry.

``python -m flows.train`` takes the dataset from raw tables to a registered, evaluated model on
embedded defaults: it runs ingest and ETL as subflows when the lake has no feature table (or
with ``--refresh-data``), lets every configured model family (``train.families``: linear,
gradient-boosted trees, the PyTorch network, a user's own) compete in one Ray Tune run, takes
the best on validation as the winner, reports every family's best on the time-based test split
side by side, tracks everything in MLflow and registers the winner (alias ``challenger``; also
``champion`` if there is none) only if it beats the prior baseline by the configured margin and
is not worse than the champion, on the same test rows, by more than it. The flow only wires: every step is a Prefect task from ``tasks/`` (its own task run,
state and duration in the UI; registry and tracking writes retried).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from core.contract import load_contract
from core.registry import Registry
from core.settings import TrainSettings, get_settings
from core.training import EPOCH_METRICS, TrainingConfig
from flows._runtime import artifact_key, lake_for, main, model_name_for, run_started

SMOKE_BUDGET = {"trials": 2, "max_epochs": 2, "num_workers": 1}


class TrainParams(BaseModel):
    """Tune, train, evaluate and register a model for a dataset."""

    dataset: str = Field("flights", description="Dataset contract name (config/datasets/<name>.yaml).")
    smoke_test: bool = Field(False, description="A sample, 2 trials, 2 epochs, 1 worker, a separate lake and model name.")
    trials: int | None = Field(None, ge=1, description="Ray Tune trials (default: settings train.trials).")
    max_epochs: int | None = Field(None, ge=1, description="Most epochs per trial (default: settings).")
    num_workers: int | None = Field(None, ge=1, description="Workers per trial: 1 trains in the trial's own "
                                    "process, 2+ a Ray Train DDP group (default: settings).")
    feature_version: int | None = Field(None, ge=0, description="Feature table version (default: latest).")
    refresh_data: bool = Field(False, description="Run ingest and ETL first even if features exist.")
    should_register: bool = Field(True, description="Register the model if it beats the baselines (--no-register: never).",
                                  json_schema_extra={"cli": "register"})
    reproduce: str | None = Field(None, description="Retrain registered version N from its recorded data, config and seed, and compare metrics.")
    use_gpu: bool = Field(False, description="Train on GPUs (each trial or Ray Train worker gets one).")
    seed: int | None = Field(None, ge=0, description="Seed for sampling, initialisation, shuffling and dropout "
                             "(default: settings train.seed); recorded with the model.")

    def training(self, settings: TrainSettings) -> TrainingConfig:
        """The one training config of this run: settings, the smoke budget, then these fields."""
        given = {k: getattr(self, k) for k in ("trials", "max_epochs", "num_workers", "seed")
                 if getattr(self, k) is not None}
        budget = {**(SMOKE_BUDGET if self.smoke_test else {}), **given}
        return TrainingConfig.from_settings(settings, **budget, use_gpu=self.use_gpu)


class TrainResult(BaseModel):
    dataset: str
    model_name: str
    feature_version: int
    mlflow_run_id: str
    training: TrainingConfig | None
    family: str = Field(description="The winning model family.")
    families: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Each family's best trial: validation loss and test metrics.")
    best_trial: dict[str, Any]
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    champion: dict[str, Any] | None
    decision: list[str]
    registered_version: str | None
    aliases: list[str]
    reproduced: dict[str, Any] | None = None
    tracking_uri: str


@flow(name="train", log_prints=True)
def train(params: TrainParams = TrainParams()) -> TrainResult:
    """Wires: data (ingest and ETL when needed) -> families on Ray Tune -> the gate -> MLflow, registry."""
    from tasks import train as t

    run_started()
    with t.ray_started_early(get_settings().ray):  # starts in the background: ready when tuning begins
        return _train(params)


def _train(params: TrainParams) -> TrainResult:
    from tasks import evaluate as e
    from tasks import registry as r
    from tasks import tracking as m
    from tasks import train as t

    settings, contract = get_settings(), load_contract(params.dataset)
    lake, model_name = lake_for(settings, params.smoke_test), model_name_for(contract.name, params.smoke_test)
    registry = Registry.for_uri(settings.tracking_uri)
    experiment_id = m.configure_mlflow(settings.tracking_uri, settings.artifact_root, model_name)
    if params.reproduce:  # before any feature work: the version must exist (its own feature version is read)
        return reproduce(params, settings, contract, lake, registry, model_name, experiment_id)
    training = params.training(settings.train)
    get_run_logger().info("training: %s", training.model_dump(exclude={"fault"}))
    data = t.load_training_data_task(lake, contract, ensure_features(params, lake, contract))
    flow_run_id = str(flow_run.id or "local")
    tags = t.run_tags(flow_run_id, data, r.git_commit())
    with m.parent_run(experiment_id, f"train-{flow_run.name or 'local'}", tags) as run:
        linear = e.fit_linear_task(data)  # starts the network's wide part: it learns a residual over it
        outcome = t.tune_task(data, settings.ray, training, t.competition(settings.train.families, training,
                              settings.train.search_space), Path(settings.ray_storage),
                              f"tune-{run.info.run_id[:12]}", wide_init=linear.wide_init)
        t.announce_winner(outcome)
        m.log_trials_task(experiment_id, run.info.run_id, outcome.trials, outcome.best.trial_id)
        model_dir = settings.home / "cache" / "models" / run.info.run_id  # a local cache: the registry holds the winner
        exported = t.export_model_task(data, outcome, model_dir)
        evaluation = e.evaluate_task({f: fitted for f, (fitted, _) in exported.items()}, outcome.family_losses(), data,
                                     settings.train.register_margin, r.champion_task(registry, model_name), lake, contract)
        picture = e.plot_task(contract.task, data.splits["test"].target, evaluation.scored,
                              model_dir / f"{run.info.run_id}-test.png")
        m.log_training_task(run.info.run_id, t.logged_params(outcome, training, data), evaluation, picture,
                            model_dir / t.export_folder(outcome.best.family), t.leaderboard(outcome))
        registered, aliases = r.register_trained_task(registry, model_name, run, tags, data, outcome, exported,
                                                      evaluation, training, params.should_register, flow_run_id)
    result = _result(settings, model_name, training, data, run, outcome, exported, evaluation, registered, aliases)
    _artifacts(result, outcome)
    if registered:
        r.announce_task(model_name, registered, aliases, evaluation.candidate.metrics, data.feature_version, contract.name)
    return result


def prepare(params: TrainParams, settings: Any) -> None:
    """Before the flow run, while Prefect's temporary server starts (``flows._runtime.main``):
    the flow's first steps are warmed, its modules imported and the MLflow store opened
    (created and migrated in a new home) with the run's experiment. No Prefect client is made;
    the flow does the same again, finding it done. (Ray starts at the flow's start, not here:
    it would take CPU from the server's start, which the flow waits for, while the ingest and
    ETL leave it time enough.)"""
    from tasks import evaluate, registry, train  # noqa: F401 - imported for the flow body
    from tasks import tracking as m

    contract = load_contract(params.dataset)
    m.configure_mlflow(settings.tracking_uri, settings.artifact_root, model_name_for(contract.name, params.smoke_test))


def _result(settings: Any, model_name: str, training: TrainingConfig, data: Any, run: Any, outcome: Any,
            exported: dict[str, Any], evaluation: Any, registered: str | None, aliases: list[str]) -> TrainResult:
    best, family = outcome.best, exported[outcome.best.family][0].family_name
    return TrainResult(
        dataset=data.dataset, model_name=model_name, feature_version=data.feature_version,
        mlflow_run_id=run.info.run_id, training=training, family=family,
        best_trial={"trial_id": best.trial_id, "family": family, **best.hyperparameters,
                    **{k: v for k, v in outcome.best_epoch.items() if k != "checkpoint_path"}},
        families={s.family: {"val_loss": s.val_loss, **s.scored.metrics} for s in evaluation.families},
        metrics=evaluation.candidate.metrics, baselines={b.name: b.metrics for b in evaluation.baselines},
        champion={"name": evaluation.champion.name, **evaluation.champion.metrics} if evaluation.champion else None,
        decision=evaluation.decision.reasons, registered_version=registered, aliases=aliases,
        tracking_uri=settings.tracking_uri)


def ensure_features(params: TrainParams, lake: Any, contract: Any) -> int | None:
    """The feature version to train on, running ingest and ETL as subflows when needed."""
    uri = lake.uri("features", contract.name)
    if not params.refresh_data and lake.exists(uri):
        return params.feature_version
    from flows.etl import EtlParams, etl
    from flows.ingest import IngestParams, ingest

    get_run_logger().info("no feature table yet (or --refresh-data): running ingest and ETL")
    ingested = ingest(IngestParams(dataset=contract.name, smoke_test=params.smoke_test))
    needed = contract.feature_tables()
    built = etl(EtlParams(dataset=contract.name, smoke_test=params.smoke_test,
                          raw_versions={t: v for t, v in ingested.raw_versions.items() if t in needed}))
    return built.feature_version


def reproduce(params: TrainParams, settings: Any, contract: Any, lake: Any, registry: Any, model_name: str,
              experiment_id: str) -> TrainResult:
    """Retrain a registered version of any family from its recorded feature version, family,
    hyperparameters, training config and seed; compare its test metrics with the recorded ones."""
    import tempfile
    from pathlib import Path

    from core.errors import FlywheelError
    from tasks.evaluate import fit_linear_task, score_model
    from tasks.registry import recorded_training_task
    from tasks.tracking import log_reproduction_task, parent_run
    from tasks.train import export_one_task, load_training_data_task, retrain_task

    logger = get_run_logger()
    recorded = recorded_training_task(registry, model_name, str(params.reproduce), use_gpu=params.use_gpu)
    data = load_training_data_task(lake, contract, recorded.feature_version)
    with parent_run(experiment_id, f"reproduce-v{recorded.version}",
                    {"flywheel.reproduces": f"{model_name}/{recorded.version}"}) as run:
        # The recorded family alone, its hyperparameters, iterations and seed, on the same Tune
        # path as the original trial (a fixed configuration, no early stopping).
        refit = retrain_task(data, settings.ray, recorded.training, recorded.family, recorded.hyperparameters,
                             recorded.epochs_trained, Path(settings.ray_storage), f"reproduce-{run.info.run_id[:12]}",
                             wide_init=fit_linear_task(data).wide_init)
        last = refit.best.history[-1] if refit.best.history else {}
        if not last.get("checkpoint_path"):
            raise FlywheelError(f"reproducing v{recorded.version} produced no checkpoint: {refit.best.error}")
        model, _ = export_one_task(data, recorded.family, recorded.hyperparameters, last["checkpoint_path"],
                                   Path(tempfile.mkdtemp(prefix="flywheel-repro-")))
        scored = score_model("reproduced", model, data)
        diffs = {k: abs(scored.metrics[k] - v) for k, v in recorded.metrics.items() if k in scored.metrics}
        log_reproduction_task(run.info.run_id, scored.metrics, diffs)
    worst = max(diffs.values()) if diffs else 0.0
    logger.info("reproduced %s v%s: metrics %s; largest difference %.2e", model_name, recorded.version,
                scored.metrics, worst)
    return TrainResult(
        dataset=contract.name, model_name=model_name, feature_version=data.feature_version,
        mlflow_run_id=run.info.run_id, training=recorded.training, family=model.family_name,
        best_trial=recorded.hyperparameters, metrics=scored.metrics, baselines={}, champion=None,
        decision=[], registered_version=None, aliases=[], tracking_uri=settings.tracking_uri,
        reproduced={"version": recorded.version, "original": recorded.metrics, "abs_diff": diffs,
                    "max_abs_diff": worst})


def _artifacts(result: TrainResult, outcome: Any) -> None:
    rows = [{"trial": t.trial_id, "family": t.family, "iterations": len(t.history),
             **{k: round(v, 5) if isinstance(v, float) else v
                for k, v in {**t.hyperparameters, **{m: t.final[m] for m in EPOCH_METRICS[1:] if m in t.final}}.items()},
             "best": t.trial_id == outcome.best.trial_id} for t in outcome.trials]
    create_table_artifact(rows, key=artifact_key("trials", result.model_name),
                          description="Ray Tune leaderboard: every family's trials")
    metrics = list(result.metrics)
    lines = [f"# {result.model_name}", "",
             f"Winner: **{result.family}**. Registered version: **{result.registered_version or 'none'}** "
             f"{result.aliases}", "",
             "| model | validation loss | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for family, values in result.families.items():
        label = f"**{family}** (winner)" if family == result.family else family
        lines.append(f"| {label} | {values['val_loss']:.4f} | "
                     + " | ".join(f"{values.get(k, float('nan')):.4f}" for k in metrics) + " |")
    for name, values in result.baselines.items():
        lines.append(f"| {name} | | " + " | ".join(f"{values.get(k, float('nan')):.4f}" for k in metrics) + " |")
    if result.champion:
        lines.append(f"| {result.champion['name']} | | " + " | ".join(
            f"{result.champion.get(k, float('nan')):.4f}" for k in metrics) + " |")
    lines += ["", *[f"- {line}" for line in result.decision], "", f"MLflow run `{result.mlflow_run_id}`"]
    create_markdown_artifact("\n".join(lines), key=artifact_key("evaluation", result.model_name),
                             description="The competition and the gate, on the time-based test split")


def report(result: TrainResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result.reproduced:
        repro = result.reproduced
        console.print(f"reproduced {result.model_name} v{repro['version']}: largest metric difference "
                      f"{repro['max_abs_diff']:.2e}")
        return
    table = Table(title=f"{result.model_name} on the test split (feature version {result.feature_version})")
    table.add_column("model")
    table.add_column("val_loss")
    for metric in result.metrics:
        table.add_column(metric)
    rows = [(f"{family} (winner)" if family == result.family else family, values)
            for family, values in result.families.items()] or [("candidate", result.metrics)]
    rows += list(result.baselines.items())
    if result.champion:
        rows.append((result.champion["name"], result.champion))
    for name, metrics in rows:
        val_loss = metrics.get("val_loss")
        table.add_row(name, f"{val_loss:.4f}" if val_loss is not None else "",
                      *(f"{metrics.get(m, float('nan')):.4f}" for m in result.metrics))
    console.print(table)
    console.print(f"best trial: {result.best_trial}")
    for line in result.decision:
        console.print(f"gate: {line}")
    if result.registered_version:
        console.print(f"registered [bold]{result.model_name}[/bold] version {result.registered_version} "
                      f"with aliases {result.aliases}")
    else:
        console.print("no model version registered")
    console.print(f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1")
    console.print("Prefect UI: .venv/bin/prefect server start  (then http://127.0.0.1:4200)")


if __name__ == "__main__":
    sys.exit(main(train, TrainParams, sys.argv[1:], "python -m flows.train", report, prepare))
