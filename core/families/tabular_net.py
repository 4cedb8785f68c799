"""``tabular_net``: the PyTorch wide-and-deep network (``core.model.TabularNet``) as a family.

Its epoch loop (``fit_epochs``) is the one every runner uses: a Tune trial training in its own
process, each worker of a Ray Train ``TorchTrainer`` (DDP, when the session's ``prepare_model``
wraps the model), and the plain PyTorch baseline of ``benchmarks/training.py``. Weights are
safetensors beside the spec; the wide part starts from the fitted linear model when the data
carries ``wide_init``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from core.families import FamilyError, FitData, FitSession, ModelFamily, validation_metrics

CHECKPOINT_FILE = "state.pt"


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def fit_epochs(data: FitData, hyperparameters: Any, session: FitSession, started: float | None = None) -> None:
    """The epoch loop: DDP when ``session.prepare_model`` wraps the model, a checkpoint and a
    report per epoch on every rank, resuming from the session's checkpoint after a failure.
    ``started`` is when the caller began, for the start-up figure it reports."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from core.model import ModelSpec, TabularNet, predict
    from core.training import Hyperparameters

    started = time.perf_counter() if started is None else started
    hp = hyperparameters if isinstance(hyperparameters, Hyperparameters) else Hyperparameters.model_validate(
        hyperparameters)
    rank, world = session.rank, session.world
    torch.set_num_threads(max(1, session.threads))
    spec = ModelSpec(**_network_fields(data.data_spec), **hp.architecture())
    seed = session.seed
    seed_everything(seed)
    model: Any = TabularNet(spec)  # a DDP wrapper after prepare_model
    if spec.wide and data.wide_init:
        model.load_wide(**data.wide_init)
    model = getattr(session, "prepare_model", lambda m: m)(model)
    device = getattr(session, "device", None) or torch.device("cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss() if spec.task == "classification" else torch.nn.MSELoss()

    categorical, numeric, target = data.train
    dataset = TensorDataset(torch.as_tensor(categorical, dtype=torch.long),
                            torch.as_tensor(numeric, dtype=torch.float32),
                            torch.as_tensor(target, dtype=torch.float32))
    sampler: DistributedSampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                     seed=seed)
    loader = DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler)

    start_epoch = 0
    resume = session.resume_from()
    if resume is not None:
        state = torch.load(Path(resume) / CHECKPOINT_FILE, weights_only=True, map_location=device)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1

    startup_s = time.perf_counter() - started
    first_epoch_at = time.time()  # wall clock: the driver compares it with the trial's start
    v_cat, v_num, v_y = data.validation
    for epoch in range(start_epoch, session.iterations):
        session.before_iteration(epoch)
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
            total += float(loss.detach())
            batches += 1
        scores = predict(_unwrap(model), v_cat, v_num)
        metrics = {"epoch": epoch, "train_loss": total / max(1, batches),
                   **validation_metrics(spec.task, v_y, scores),
                   # Start-up inside the process (from its function's start to its first
                   # epoch), and when the first epoch began, for the driver's measure of the
                   # whole trial start-up (scheduling, process and group start included).
                   "startup_s": startup_s if epoch == start_epoch else 0.0,
                   "first_epoch_at": first_epoch_at if epoch == start_epoch else 0.0}
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                            "epoch": epoch}, Path(folder) / CHECKPOINT_FILE)
            session.report(metrics, Path(folder) if rank == 0 else None)  # every rank reports (a barrier)


_NETWORK_FIELDS = ("task", "categorical", "numeric", "cardinalities", "output_bias", "wide", "deep_numeric")


def _network_fields(data_spec: dict[str, Any]) -> dict[str, Any]:
    fields = {k: v for k, v in data_spec.items() if k in _NETWORK_FIELDS}
    # The network's own design: numerics only in the wide part, which starts from the linear fit.
    fields.setdefault("wide", True)
    fields.setdefault("deep_numeric", False)
    return fields


class TabularNetFamily(ModelFamily):
    name: ClassVar[str] = "tabular_net"
    weights_file: ClassVar[str] = "weights.safetensors"
    distributed: ClassVar = "torch"
    iteration_name: ClassVar[str] = "epoch"

    def default_space(self) -> dict[str, Any]:
        from core.settings import SearchSpace

        return search_space_dict(SearchSpace())

    def validate(self, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError

        from core.training import Hyperparameters

        try:
            return Hyperparameters.model_validate(hyperparameters).model_dump()
        except ValidationError as exc:
            raise FamilyError(f"tabular_net hyperparameters: {exc}") from None

    def fit(self, data: FitData, hyperparameters: dict[str, Any], session: FitSession) -> None:
        fit_epochs(data, self.validate(hyperparameters), session)

    def _spec(self, data_spec: dict[str, Any], hyperparameters: dict[str, Any]) -> Any:
        from core.model import ModelSpec
        from core.training import Hyperparameters

        hp = Hyperparameters.model_validate(hyperparameters)
        return ModelSpec(**_network_fields(data_spec), **hp.architecture())

    def _network(self, data_spec: dict[str, Any], hyperparameters: dict[str, Any]) -> Any:
        from core.model import TabularNet

        return TabularNet(self._spec(data_spec, hyperparameters))

    def from_checkpoint(self, data_spec: dict[str, Any], hyperparameters: dict[str, Any], folder: Path) -> Any:
        import torch

        model = self._network(data_spec, hyperparameters)
        state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        model.eval()
        return model

    def predict(self, model: Any, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        from core.model import predict

        return predict(model, categorical, numeric)

    def model_spec(self, data_spec: dict[str, Any], hyperparameters: dict[str, Any]) -> dict[str, Any]:
        # The network's spec fields at the top level, as folders written before families had
        # them (core.model.ModelSpec reads them back).
        return {**self._spec(data_spec, hyperparameters).model_dump(), "hyperparameters": hyperparameters}

    def save(self, model: Any, folder: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(folder / self.weights_file))

    def load(self, folder: Path, spec: dict[str, Any]) -> Any:
        from safetensors.torch import load_file

        from core.model import ModelSpec, TabularNet

        model = TabularNet(ModelSpec.model_validate({k: v for k, v in spec.items() if k in ModelSpec.model_fields}))
        model.load_state_dict(load_file(str(folder / self.weights_file)))
        model.eval()
        return model


def search_space_dict(space: Any) -> dict[str, Any]:
    """The settings' ``SearchSpace`` (tuples are log-uniform ranges, lists choices) as a family space."""
    out: dict[str, Any] = {}
    for name, value in space.model_dump().items():
        out[name] = {"loguniform": list(value)} if isinstance(value, tuple) else list(value)
    return out
