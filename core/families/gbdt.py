"""``gbdt``: LightGBM gradient-boosted trees as a family.

One iteration of ``fit`` is a block of ``rounds_per_iteration`` boosting rounds: after each, the
validation metrics and a checkpoint (the booster in LightGBM's own text format) are reported,
so Ray Tune's ASHA can stop a poor trial early and the best block is the model kept (early
stopping). A resumed trial continues from its last checkpoint's booster (``init_model``).

Categorical codes are passed as LightGBM categorical features (code 0, unseen, is its own
category). Training is deterministic for a seed and thread count (``deterministic``,
``force_row_wise``). With several Ray Train workers (``train.num_workers`` > 1, Ray Train's
``LightGBMTrainer``), each worker takes every ``world``-th training row and LightGBM's
data-parallel tree learner joins them over the network parameters the session gives.

Saved as ``model.txt`` (LightGBM's text model; nothing is unpickled).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from core.families import FamilyError, FitData, FitSession, ModelFamily, validation_metrics

MODEL_FILE = "model.txt"
_KNOWN = {"learning_rate", "num_leaves", "min_data_in_leaf", "feature_fraction", "lambda_l2",
          "rounds_per_iteration", "max_bin", "cat_smooth"}


def _matrix(categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
    return np.hstack([categorical.astype(np.float64), numeric.astype(np.float64)])


class GbdtFamily(ModelFamily):
    name: ClassVar[str] = "gbdt"
    weights_file: ClassVar[str] = MODEL_FILE
    distributed: ClassVar = "lightgbm"
    iteration_name: ClassVar[str] = "block of boosting rounds"

    def default_space(self) -> dict[str, Any]:
        return {"learning_rate": {"loguniform": [0.05, 0.15]}, "num_leaves": [15, 31, 63],
                "min_data_in_leaf": [20, 100], "feature_fraction": [0.8, 1.0], "lambda_l2": [0.0, 1.0],
                "rounds_per_iteration": [40]}

    def default_trials(self) -> int | None:
        return 3

    def validate(self, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        unknown = set(hyperparameters) - _KNOWN
        if unknown:
            raise FamilyError(f"gbdt hyperparameters: unknown {sorted(unknown)}; known: {sorted(_KNOWN)}")
        values = dict(hyperparameters)
        if int(values.get("rounds_per_iteration", 40)) < 1:
            raise FamilyError("gbdt hyperparameters: rounds_per_iteration must be at least 1")
        return values

    def params(self, task: str, hyperparameters: dict[str, Any], threads: int, seed: int) -> dict[str, Any]:
        hp = {k: v for k, v in self.validate(hyperparameters).items() if k != "rounds_per_iteration"}
        return {"objective": "binary" if task == "classification" else "regression",
                "metric": "binary_logloss" if task == "classification" else "l2",
                "num_threads": max(1, threads), "seed": seed, "deterministic": True, "force_row_wise": True,
                "verbosity": -1, **hp}

    def fit(self, data: FitData, hyperparameters: dict[str, Any], session: FitSession) -> None:
        import lightgbm as lgb

        hyperparameters = self.validate(hyperparameters)
        rounds = int(hyperparameters.get("rounds_per_iteration", 40))
        params = self.params(data.task, hyperparameters, session.threads, session.seed)
        cat, num, y = data.train
        if session.world > 1:
            # Data parallel over Ray Train workers: each holds its share of the rows.
            cat, num, y = cat[session.rank::session.world], num[session.rank::session.world], y[session.rank::session.world]
            params.update({"tree_learner": "data_parallel", "pre_partition": True,
                           **(getattr(session, "lightgbm_params", None) or {})})
        n_categorical = cat.shape[1]
        categorical_features = list(range(n_categorical))
        train_set = lgb.Dataset(_matrix(cat, num), label=y, categorical_feature=categorical_features,
                                free_raw_data=False, params={"max_bin": params.get("max_bin", 255)})
        v_cat, v_num, v_y = data.validation
        v_x = _matrix(v_cat, v_num)

        init_model = None
        resume = session.resume_from()
        if resume is not None:
            init_model = lgb.Booster(model_file=str(Path(resume) / MODEL_FILE))
        done = init_model.current_iteration() if init_model is not None else 0
        total = session.iterations * rounds
        if done >= total:
            return
        # The validation set's raw scores, kept up to date one block of new trees at a time (a
        # prediction with every tree at each block would cost more than the boosting itself).
        raw = np.zeros(len(v_y))
        if init_model is not None:
            raw += np.asarray(init_model.predict(v_x, raw_score=True, num_threads=params["num_threads"]),
                              dtype=np.float64)
        scored = done  # rounds whose trees are in ``raw``

        def before(env: Any) -> None:
            if env.iteration % rounds == 0:
                session.before_iteration(env.iteration // rounds)

        before.before_iteration = True  # type: ignore[attr-defined]

        def after(env: Any) -> None:
            nonlocal scored
            finished = env.iteration + 1
            if finished % rounds and finished != total:
                return
            booster = env.model
            raw[:] += np.asarray(booster.predict(v_x, start_iteration=scored, num_iteration=finished - scored,
                                                 raw_score=True, num_threads=params["num_threads"]), dtype=np.float64)
            scored = finished
            scores = 1.0 / (1.0 + np.exp(-raw)) if data.task == "classification" else raw
            metrics = {"epoch": (finished - 1) // rounds, "train_loss": float("nan"),
                       **validation_metrics(data.task, v_y, scores), "rounds": finished}
            with tempfile.TemporaryDirectory() as folder:
                if session.rank == 0:
                    booster.save_model(str(Path(folder) / MODEL_FILE))
                session.report(metrics, Path(folder) if session.rank == 0 else None)

        lgb.train(params, train_set, num_boost_round=total - done, init_model=init_model, callbacks=[before, after])

    def from_checkpoint(self, data_spec: dict[str, Any], hyperparameters: dict[str, Any], folder: Path) -> Any:
        return self.load(folder, data_spec)

    def predict(self, model: Any, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        # Binary objective: probabilities; regression: values.
        return np.asarray(model.predict(_matrix(categorical, numeric), num_threads=1), dtype=np.float64)

    def save(self, model: Any, folder: Path) -> None:
        model.save_model(str(folder / MODEL_FILE))

    def load(self, folder: Path, spec: dict[str, Any]) -> Any:
        import lightgbm as lgb

        return lgb.Booster(model_file=str(folder / MODEL_FILE))
