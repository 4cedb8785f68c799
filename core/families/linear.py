"""``linear``: logistic regression (classification) or ridge (regression) on one-hot categories
and numerics, as a family of its own.

Fitted with scikit-learn (lbfgs or closed form: deterministic), stored as safetensors arrays (one
weight per category of each categorical, one per numeric, the intercept) and scored with numpy:
serving needs neither scikit-learn nor torch for it. The same weights start the network's wide
part (``tabular_net``), so the network begins where this model ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from core.families import FitData, FitSession, ModelFamily, validation_metrics

WEIGHTS = "linear.safetensors"


def design(categorical: np.ndarray, numeric: np.ndarray, cardinalities: list[int]) -> Any:
    """One-hot categorical codes beside the numerics, as a sparse matrix."""
    from scipy import sparse

    n = len(categorical)
    offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]]).astype(np.int64)
    rows = np.repeat(np.arange(n), categorical.shape[1])
    cols = (categorical + offsets).ravel()
    onehot = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(n, int(sum(cardinalities))))
    return sparse.hstack([onehot, sparse.csr_matrix(numeric)]).tocsr()


def fit_weights(task: str, categorical: np.ndarray, numeric: np.ndarray, target: np.ndarray,
                cardinalities: list[int], strength: float = 1.0) -> dict[str, Any]:
    """The fitted model as weights: ``{"categorical": [per-feature arrays], "numeric", "intercept"}``.
    ``strength`` is the inverse regularization (logistic ``C``; ridge ``alpha = 1/strength``)."""
    x = design(categorical, numeric, cardinalities)
    if task == "classification":
        from sklearn.linear_model import LogisticRegression

        model: Any = LogisticRegression(max_iter=300, C=strength).fit(x, target)
    else:
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=1.0 / strength).fit(x, target)
    coef = np.asarray(model.coef_, dtype=np.float32).ravel()
    offsets = np.concatenate([[0], np.cumsum(cardinalities)]).astype(np.int64)
    return {"categorical": [coef[offsets[i]:offsets[i + 1]] for i in range(len(cardinalities))],
            "numeric": coef[offsets[-1]:], "intercept": float(np.ravel(model.intercept_)[0])}


class LinearModel:
    """Weights and the link: logit for classification, identity for regression."""

    def __init__(self, task: str, weights: dict[str, Any]):
        self.task = task
        self.categorical = [np.asarray(w, dtype=np.float64) for w in weights["categorical"]]
        self.numeric = np.asarray(weights["numeric"], dtype=np.float64)
        self.intercept = float(weights["intercept"])

    def raw(self, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        out = numeric.astype(np.float64) @ self.numeric + self.intercept
        for i, weights in enumerate(self.categorical):
            out += weights[categorical[:, i]]
        return out

    def scores(self, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        raw = self.raw(categorical, numeric)
        return 1.0 / (1.0 + np.exp(-raw)) if self.task == "classification" else raw

    def weights(self) -> dict[str, Any]:
        return {"categorical": self.categorical, "numeric": self.numeric, "intercept": self.intercept}


class LinearFamily(ModelFamily):
    name: ClassVar[str] = "linear"
    weights_file: ClassVar[str] = WEIGHTS
    iteration_name: ClassVar[str] = "fit"

    def default_space(self) -> dict[str, Any]:
        return {"strength": [1.0]}

    def default_trials(self) -> int | None:
        return 1

    def fit(self, data: FitData, hyperparameters: dict[str, Any], session: FitSession) -> None:
        # One closed-form (or lbfgs) fit: reported once, as the family's only iteration.
        session.before_iteration(0)
        cat, num, y = data.train
        model = LinearModel(data.task, fit_weights(data.task, cat, num, y, data.data_spec["cardinalities"],
                                                   float(hyperparameters.get("strength", 1.0))))
        v_cat, v_num, v_y = data.validation
        metrics = {"epoch": 0, "train_loss": float("nan"),
                   **validation_metrics(data.task, v_y, model.scores(v_cat, v_num))}
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            if session.rank == 0:
                self.save(model, Path(folder))
            session.report(metrics, Path(folder) if session.rank == 0 else None)

    def from_checkpoint(self, data_spec: dict[str, Any], hyperparameters: dict[str, Any], folder: Path) -> Any:
        return self.load(folder, data_spec)

    def predict(self, model: Any, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        return model.scores(categorical, numeric)

    def save(self, model: Any, folder: Path) -> None:
        from safetensors.numpy import save_file

        tensors = {f"categorical.{i}": np.ascontiguousarray(w, dtype=np.float64)
                   for i, w in enumerate(model.categorical)}
        tensors["numeric"] = np.ascontiguousarray(model.numeric, dtype=np.float64)
        tensors["intercept"] = np.array([model.intercept], dtype=np.float64)
        save_file(tensors, str(folder / WEIGHTS), metadata={"task": model.task})

    def load(self, folder: Path, spec: dict[str, Any]) -> Any:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS), framework="numpy") as handle:
            task = (handle.metadata() or {}).get("task") or spec["task"]
            count = sum(1 for key in handle.keys() if key.startswith("categorical."))
            weights = {"categorical": [handle.get_tensor(f"categorical.{i}") for i in range(count)],
                       "numeric": handle.get_tensor("numeric"),
                       "intercept": float(handle.get_tensor("intercept")[0])}
        return LinearModel(task, weights)
