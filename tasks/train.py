"""Training work: feature table -> arrays, tuning on Ray, exporting the chosen model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.contract import DatasetContract
from core.features import SPLIT_COLUMN, FeatureStats
from core.lake import Lake, LakeError, read_arrow
from core.settings import RaySettings, SearchSpace
from core.training import Hyperparameters, LoopConfig, TrainingConfig

if TYPE_CHECKING:
    from compute.train import FitResult, TuneOutcome

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
                "output_bias": _output_bias(self.task, self.stats.label_mean),
                "wide": True, "deep_numeric": False}


def _output_bias(task: str, label_mean: float) -> float:
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
    return TrainingData(contract.name, contract.task, uri, version, stats, stats_json,
                        json.loads(metadata.get("flywheel.raw_tables", "{}")), categorical, numeric, splits)


def _payload(data: TrainingData, wide_init: dict[str, Any] | None) -> dict[str, Any]:
    """What every Train worker reads from the object store."""
    payload: dict[str, Any] = {s: data.splits[s].as_tuple() for s in ("train", "validation")}
    payload["wide_init"] = wide_init
    return payload


def tune(data: TrainingData, ray: RaySettings, training: TrainingConfig, space: SearchSpace, storage: Path,
         name: str, wide_init: dict[str, Any] | None = None) -> TuneOutcome:
    """Ray Tune over ``space`` on the configured Ray cluster, as ``training`` says (trials,
    epochs, scheduler, workers per trial, GPUs, seed, recovery)."""
    from compute.ray_session import ray_session
    from compute.train import search_space, share, tune_model

    with ray_session(ray):
        return tune_model(training, data.spec_base(), share(_payload(data, wide_init)), search_space(space),
                          str(storage), name)


def export_model(data: TrainingData, hyperparameters: Hyperparameters, checkpoint_path: str,
                 folder: Path) -> tuple[Any, str]:
    """Rebuild the best trial's network from its checkpoint; save it safely. Returns (model, sha256)."""
    from compute.train import load_checkpoint_state
    from core.model import ModelSpec, TabularNet, save_model

    model = TabularNet(ModelSpec(**data.spec_base(), **hyperparameters.architecture()))
    model.load_state_dict(load_checkpoint_state(checkpoint_path))
    model.eval()
    return model, save_model(model, folder, data.stats_json)


def retrain(data: TrainingData, ray: RaySettings, training: TrainingConfig, hyperparameters: Hyperparameters,
            epochs: int, storage: Path, name: str, wide_init: dict[str, Any] | None = None) -> FitResult:
    """One Ray Train fit with fixed hyperparameters and epochs (``--reproduce``)."""
    from compute.ray_session import ray_session
    from compute.train import fit, share

    with ray_session(ray):
        loop = LoopConfig(training=training, data_spec=data.spec_base(), epochs=epochs,
                          threads_per_worker=max(1, (ray.num_cpus or os.cpu_count() or 1) // training.num_workers))
        return fit(loop, hyperparameters, share(_payload(data, wide_init)), str(storage), name)


# Prefect tasks: thin wrappers, defined once. Arrays and models are passed in memory, never
# hashed for a cache key (NO_CACHE).
load_training_data_task = task(name="load training data", cache_policy=NO_CACHE)(load_training_data)
tune_task = task(name="tune", cache_policy=NO_CACHE)(tune)
export_model_task = task(name="export model", cache_policy=NO_CACHE)(export_model)
retrain_task = task(name="retrain", cache_policy=NO_CACHE)(retrain)
