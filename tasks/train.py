"""Training work: feature table -> arrays, tuning on Ray, exporting the chosen model."""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.contract import DatasetContract
from core.features import SPLIT_COLUMN, FeatureStats
from core.lake import Lake, LakeError, read_arrow
from core.settings import FamilySettings, RaySettings, SearchSpace
from core.training import TrainingConfig

if TYPE_CHECKING:
    from compute.train import TuneOutcome
    from core.families import Fitted

log = logging.getLogger(__name__)

@dataclass
class SplitArrays:
    categorical: np.ndarray
    numeric: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.target)

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.categorical, self.numeric, self.target


@dataclass
class TrainingData:
    """A feature table version as arrays, with what produced it."""

    dataset: str
    task: str
    feature_uri: str
    feature_version: int
    stats: FeatureStats
    stats_json: str
    raw_tables: dict[str, Any]
    categorical: list[str]
    numeric: list[str]
    splits: dict[str, SplitArrays]

    def spec_base(self) -> dict[str, Any]:
        """The model spec fields fixed by the data (the rest are hyperparameters)."""
        cards = self.stats.cardinalities()
        return {"task": self.task, "categorical": self.categorical, "numeric": self.numeric,
                "cardinalities": [cards[c] for c in self.categorical],
                "output_bias": output_bias(self.task, self.stats.label_mean),
                "wide": True, "deep_numeric": False}


def output_bias(task: str, label_mean: float) -> float:
    if task == "classification":
        p = min(max(label_mean, 1e-4), 1 - 1e-4)
        return float(np.log(p / (1 - p)))
    return float(label_mean)


def load_training_data(lake: Lake, contract: DatasetContract, feature_version: int | None = None,
                       sample_every: int = 1) -> TrainingData:
    """Read a feature table version (default latest) into per-split arrays."""
    from compute.etl import STATS_KEY

    uri = lake.uri("features", contract.name)
    if not lake.exists(uri):
        raise LakeError(f"no feature table at {uri}: run `python -m flows.etl` first")
    table = lake.table(uri, feature_version)
    version = table.version()
    metadata = lake.commit_metadata(uri, version)
    stats_json = metadata[STATS_KEY]
    stats = FeatureStats.from_json(stats_json)
    categorical, numeric = contract.features.categorical, contract.features.numeric
    columns = [SPLIT_COLUMN, contract.target.name, *categorical, *numeric]
    frame = read_arrow(table, columns).to_pandas()
    if sample_every > 1:
        frame = frame.iloc[::sample_every]
    splits = {}
    for split in ("train", "validation", "test"):
        part = frame[frame[SPLIT_COLUMN] == split]
        if part.empty:
            raise LakeError(f"feature table version {version} has no {split} rows")
        splits[split] = SplitArrays(part[categorical].to_numpy(np.int64),
                                    part[numeric].to_numpy(np.float32),
                                    part[contract.target.name].to_numpy(np.float32))
    data = TrainingData(contract.name, contract.task, uri, version, stats, stats_json,
                        json.loads(metadata.get("flywheel.raw_tables", "{}")), categorical, numeric, splits)
    log.info("training data: feature table version %d, rows %s", version, {k: len(v) for k, v in splits.items()})
    return data


def _payload(data: TrainingData, wide_init: dict[str, Any] | None) -> dict[str, Any]:
    """What every trial and Train worker reads from the object store."""
    payload: dict[str, Any] = {s: data.splits[s].as_tuple() for s in ("train", "validation")}
    payload["wide_init"] = wide_init
    return payload


def competition(families: list[FamilySettings], training: TrainingConfig,
                net_space: SearchSpace) -> list[tuple[str, dict[str, Any], int]]:
    """Each configured family with its search space and number of trials: the family's own
    space unless settings give one (``tabular_net``: ``train.search_space``), and
    ``train.trials`` trials, or fewer where the family needs fewer (``linear``: one)."""
    from core.families import resolve
    from core.families.tabular_net import search_space_dict

    out = []
    for entry in families:
        family = resolve(entry.family)
        if entry.space is not None:
            space = entry.space
        elif family.name == "tabular_net":
            space = search_space_dict(net_space)
        else:
            space = family.default_space()
        trials = entry.trials if entry.trials is not None else min(
            training.trials, family.default_trials() or training.trials)
        if trials > 0:
            out.append((entry.family, space, trials))
    return out


def tune(data: TrainingData, ray: RaySettings, training: TrainingConfig,
         families: list[tuple[str, dict[str, Any], int]], storage: Path, name: str,
         wide_init: dict[str, Any] | None = None) -> TuneOutcome:
    """One Ray Tune competition of the given families (``competition``) on the configured Ray
    cluster, as ``training`` says (iterations, scheduler, workers per trial, GPUs, seed, recovery)."""
    from compute.ray_session import ray_session
    from compute.train import plan, share, tune_model

    with ray_session(ray):
        return tune_model(training, data.spec_base(), share(_payload(data, wide_init)),
                          plan(families, training.seed), str(storage), name)


def ray_started_early(ray: RaySettings) -> AbstractContextManager[bool]:
    """For the block: the Ray that ``tune`` or ``retrain`` will use starts now, in the
    background (``compute.ray_session.started_early``): a local Ray takes seconds to start,
    which the work before tuning (ingest, ETL) hides. Shut down at the block's end if unused."""
    from compute.ray_session import started_early

    return started_early(ray)


def export_model(data: TrainingData, family: str, hyperparameters: dict[str, Any], checkpoint_path: str,
                 folder: Path) -> tuple[Fitted, str]:
    """Rebuild a trial's model from its checkpoint and save it in its family's safe format.
    Returns (model, weights sha256)."""
    from core.families import Fitted, resolve, save_fitted

    chosen = resolve(family)
    spec = data.spec_base()
    fitted = Fitted(chosen, chosen.from_checkpoint(spec, hyperparameters, Path(checkpoint_path)),
                    chosen.model_spec(spec, hyperparameters))
    return fitted, save_fitted(fitted, folder, data.stats_json)


def export_families(data: TrainingData, outcome: TuneOutcome, folder: Path) -> dict[str, tuple[Fitted, str]]:
    """Each family's best trial exported (the winner's family first): ``{family: (model, sha256)}``."""
    out = {}
    for family, trial in outcome.best_by_family().items():
        best = trial.best_epoch(outcome.metric)
        out[family] = export_model(data, family, trial.hyperparameters, best["checkpoint_path"],
                                   folder / export_folder(family))
    return out


def export_folder(family: str) -> str:
    """The folder of a family's export under the run's model folder."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in family)


def retrain(data: TrainingData, ray: RaySettings, training: TrainingConfig, family: str,
            hyperparameters: dict[str, Any], epochs: int, storage: Path, name: str,
            wide_init: dict[str, Any] | None = None) -> TuneOutcome:
    """One trial of one family with fixed hyperparameters and iterations (``--reproduce``): the
    same Tune path the original trial took, so the same seed gives the same model."""
    from compute.ray_session import ray_session
    from compute.train import FamilyPlan, share, tune_model

    fixed = training.model_copy(update={"trials": 1, "max_epochs": epochs, "scheduler": "fifo"})
    with ray_session(ray):
        return tune_model(fixed, data.spec_base(), share(_payload(data, wide_init)),
                          [FamilyPlan(family, [hyperparameters])], str(storage), name)


# Prefect tasks: thin wrappers, defined once. Arrays and models are passed in memory, never
# hashed for a cache key (NO_CACHE).
def run_tags(flow_run_id: str, data: TrainingData, git_commit: str) -> dict[str, str]:
    """The MLflow parent run's tags: the Prefect run, the dataset, the feature version, the commit."""
    return {"flywheel.prefect_flow_run_id": flow_run_id, "flywheel.dataset": data.dataset,
            "flywheel.feature_version": str(data.feature_version), "mlflow.source.git.commit": git_commit}


def announce_winner(outcome: TuneOutcome) -> None:
    best, epoch = outcome.best, outcome.best_epoch
    log.info("winner: %s trial %s at iteration %d of %d: %s", best.family, best.trial_id, epoch["epoch"],
             len(best.history), {k: v for k, v in epoch.items() if k != "checkpoint_path"})


def leaderboard(outcome: TuneOutcome) -> list[dict[str, Any]]:
    """Every trial of every family: its hyperparameters, iterations and final metrics."""
    return [{"trial_id": t.trial_id, "family": t.family, **t.hyperparameters, "iterations": len(t.history),
             **{k: v for k, v in t.final.items() if k != "checkpoint_path"}} for t in outcome.trials]


def logged_params(outcome: TuneOutcome, training: TrainingConfig, data: TrainingData) -> dict[str, Any]:
    """The parameters logged on the MLflow parent run."""
    return {"family": outcome.best.family, **outcome.best.hyperparameters, **training.model_dump(exclude={"fault"}),
            "epochs_trained": outcome.epochs_trained, "feature_version": data.feature_version}


load_training_data_task = task(name="load training data", cache_policy=NO_CACHE)(load_training_data)
tune_task = task(name="tune", cache_policy=NO_CACHE)(tune)
export_model_task = task(name="export model", cache_policy=NO_CACHE)(export_families)
export_one_task = task(name="export model", cache_policy=NO_CACHE)(export_model)
retrain_task = task(name="retrain", cache_policy=NO_CACHE)(retrain)
