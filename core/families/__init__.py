"""Model families: one interface for every kind of model that competes in a train run.

A family knows how to fit itself on the feature table's encoded arrays (categorical codes and
standardized numerics), score, save in a safe format, load, and describe itself (its
hyperparameter space and its ``model_spec``). Three are built in:

- ``tabular_net``: the PyTorch wide-and-deep network (``core.model``), safetensors;
- ``linear``: a logistic (classification) or ridge (regression) model on one-hot categories and
  numerics, scored with numpy, safetensors;
- ``gbdt``: LightGBM gradient-boosted trees, in LightGBM's own text model format.

A user's own family plugs in by dotted path in settings (``train.families: [...,
"my_package.models:MyFamily"]``): a ``ModelFamily`` subclass importable wherever training and
serving run. Nothing else changes: the flows, tasks, serving and monitoring call only this
interface. ``compute/`` runs ``fit`` inside Ray (a Tune trial in its own process, or a Ray
Train worker group for families that distribute), giving it a ``FitSession`` to report to.

Nothing here imports torch, LightGBM or Ray at import time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from core.errors import FlywheelError

SPEC_FILE = "model_spec.json"
STATS_FILE = "feature_stats.json"

BUILT_IN: dict[str, str] = {
    "linear": "core.families.linear:LinearFamily",
    "gbdt": "core.families.gbdt:GbdtFamily",
    "tabular_net": "core.families.tabular_net:TabularNetFamily",
}


class FamilyError(FlywheelError, ValueError):
    """A family cannot be found, or a model folder or hyperparameters do not fit it."""


class ModelIntegrityError(FlywheelError):
    """A model's weights do not match their recorded hash."""


# --------------------------------------------------------------------------- data and session
@dataclass
class FitData:
    """What every family fits on: train and validation arrays of one feature table version and
    the model-spec fields the data fixes (task, feature names, cardinalities, output bias)."""

    data_spec: dict[str, Any]
    train: tuple[np.ndarray, np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray, np.ndarray]
    wide_init: dict[str, Any] | None = None

    @property
    def task(self) -> str:
        return str(self.data_spec["task"])

    @classmethod
    def from_payload(cls, data_spec: dict[str, Any], payload: dict[str, Any]) -> FitData:
        return cls(data_spec, payload["train"], payload["validation"], payload.get("wide_init"))


class FitSession(Protocol):
    """What ``fit`` reports to (a Tune trial, a Ray Train worker, or a plain script).

    ``report`` is called once per iteration (an epoch, a block of boosting rounds) by every rank,
    with the folder rank 0 saved a checkpoint in (None on the other ranks); ``resume_from``
    is the folder of the checkpoint to resume from after a failure, or None.
    """

    rank: int
    world: int
    iterations: int
    threads: int
    seed: int

    def report(self, metrics: dict[str, float], folder: Path | None) -> None: ...

    def resume_from(self) -> Path | None: ...

    def before_iteration(self, iteration: int) -> None: ...


# --------------------------------------------------------------------------- search spaces
def sample(space: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """One draw from a family's space. A list is a choice; ``{"loguniform": [lo, hi]}``,
    ``{"uniform": [lo, hi]}`` and ``{"randint": [lo, hi]}`` (inclusive) are ranges; a scalar
    is fixed."""
    drawn: dict[str, Any] = {}
    for name, dim in space.items():
        if isinstance(dim, list | tuple):
            drawn[name] = _plain(dim[int(rng.integers(len(dim)))])
        elif isinstance(dim, dict) and len(dim) == 1:
            (kind, bounds), = dim.items()
            low, high = bounds
            if kind == "loguniform":
                drawn[name] = float(math.exp(rng.uniform(math.log(low), math.log(high))))
            elif kind == "uniform":
                drawn[name] = float(rng.uniform(low, high))
            elif kind == "randint":
                drawn[name] = int(rng.integers(int(low), int(high) + 1))
            else:
                raise FamilyError(f"search space {name!r}: unknown range {kind!r} (loguniform, uniform, randint)")
        else:
            drawn[name] = _plain(dim)
    return drawn


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------- the interface
class ModelFamily(ABC):
    """One kind of model. Subclass it, name it, and list its dotted path in ``train.families``.

    ``fit`` reports once per iteration with a checkpoint folder; ``from_checkpoint`` rebuilds
    the model from one; ``save``/``load`` write and read the family's safe format (never pickle)
    in a folder, the weights in ``weights_file`` (its sha256 is recorded and checked);
    ``predict`` returns probabilities (classification) or values (regression).
    """

    name: ClassVar[str]
    weights_file: ClassVar[str]
    # "torch" or "lightgbm": with train.num_workers > 1 each trial fits a Ray Train worker group
    # of that kind; None: the family always trains in one process.
    distributed: ClassVar[Literal["torch", "lightgbm"] | None] = None
    # What one iteration of fit is, for logs ("epoch", "round block").
    iteration_name: ClassVar[str] = "iteration"

    @abstractmethod
    def default_space(self) -> dict[str, Any]:
        """The hyperparameter space Ray Tune samples when settings give none."""

    def default_trials(self) -> int | None:
        """How many trials this family needs at most (None: the settings' ``train.trials``)."""
        return None

    def validate(self, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters as this family takes them; a ``FamilyError`` naming what is wrong."""
        return dict(hyperparameters)

    @abstractmethod
    def fit(self, data: FitData, hyperparameters: dict[str, Any], session: FitSession) -> None:
        """Train for ``session.iterations`` iterations (resuming from ``session.resume_from()``),
        reporting validation metrics (``val_loss`` and ``val_auc`` or ``val_rmse``) and a
        checkpoint after each."""

    @abstractmethod
    def from_checkpoint(self, data_spec: dict[str, Any], hyperparameters: dict[str, Any], folder: Path) -> Any:
        """The model saved in a checkpoint folder by ``fit``."""

    @abstractmethod
    def predict(self, model: Any, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        """Scores as float numpy: probabilities (classification) or values (regression)."""

    @abstractmethod
    def save(self, model: Any, folder: Path) -> None:
        """Write the model's weights as ``folder / weights_file``, in a safe format."""

    @abstractmethod
    def load(self, folder: Path, spec: dict[str, Any]) -> Any:
        """Read what ``save`` wrote (the sha256 was checked before)."""

    def model_spec(self, data_spec: dict[str, Any], hyperparameters: dict[str, Any]) -> dict[str, Any]:
        """What rebuilds the model besides its weights: the data's fields and the hyperparameters."""
        return {**data_spec, "hyperparameters": hyperparameters}


def family_path(name: str) -> str:
    """A built-in family's name or a dotted path (``pkg.module:Class`` or ``pkg.module.Class``)."""
    return BUILT_IN.get(name, name)


def resolve(name: str) -> ModelFamily:
    """The family for a built-in name or a dotted path; a clear error if there is none."""
    path = family_path(name)
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise FamilyError(f"model family {name!r}: not a built-in ({', '.join(BUILT_IN)}) nor a dotted "
                          "path such as my_package.models:MyFamily")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FamilyError(f"model family {name!r}: cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
        raise FamilyError(f"model family {name!r}: {path} is not a ModelFamily subclass")
    return cls()


# --------------------------------------------------------------------------- saved models
@dataclass
class Fitted:
    """A model of some family, ready to score; what serving, monitoring and evaluation hold."""

    family: ModelFamily
    model: Any
    spec: dict[str, Any]

    @property
    def family_name(self) -> str:
        return self.family.name

    @property
    def task(self) -> str:
        return str(self.spec["task"])

    def predict(self, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        if len(categorical) == 0:
            return np.empty(0, dtype=np.float64)
        return np.asarray(self.family.predict(self.model, categorical, numeric), dtype=np.float64)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_fitted(fitted: Fitted, folder: Path, stats_json: str) -> str:
    """Write the model (its family's safe format), its spec and the feature stats; returns the
    weights' sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    fitted.family.save(fitted.model, folder)
    spec = {**fitted.spec, "family": fitted.family.name, "family_path": _path_of(fitted.family),
            "weights_file": fitted.family.weights_file}
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True, default=str))
    (folder / STATS_FILE).write_text(stats_json)
    return sha256_file(folder / fitted.family.weights_file)


def _path_of(family: ModelFamily) -> str:
    cls = type(family)
    return f"{cls.__module__}:{cls.__qualname__}"


def read_spec(folder: Path) -> dict[str, Any]:
    spec = json.loads((folder / SPEC_FILE).read_text())
    spec.setdefault("family", "tabular_net")  # folders written before families existed
    return spec


def load_fitted(folder: Path, expected_sha256: str | None) -> Fitted:
    """Rebuild a model from its folder with the family its spec names; refuse weights whose
    sha256 differs from the recorded one (before reading them)."""
    spec = read_spec(folder)
    family = resolve(spec.get("family_path") or spec["family"])
    weights = folder / family.weights_file
    if not weights.exists():
        raise ModelIntegrityError(f"{folder}: no {family.weights_file} for a {family.name} model")
    actual = sha256_file(weights)
    if expected_sha256 is not None and actual != expected_sha256:
        raise ModelIntegrityError(
            f"{weights}: sha256 {actual[:16]}… does not match the recorded {expected_sha256[:16]}…")
    return Fitted(family, family.load(folder, spec), spec)


# --------------------------------------------------------------------------- shared metrics
def validation_metrics(task: str, target: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The per-iteration validation metrics every family reports (lower ``val_loss`` is better):
    log loss and ROC AUC (classification), MSE and RMSE (regression)."""
    y = np.asarray(target, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if task == "classification":
        from sklearn.metrics import roc_auc_score

        p = np.clip(s, 1e-7, 1 - 1e-7)
        loss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        auc = float(roc_auc_score(y, s)) if 0 < y.mean() < 1 else float("nan")
        return {"val_loss": loss, "val_auc": auc}
    mse = float(((s - y) ** 2).mean())
    return {"val_loss": mse, "val_rmse": mse ** 0.5}
