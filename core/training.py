"""The training configuration: one typed object from the command line to the worker.

``TrainingConfig`` is resolved once, in the train flow, from settings and the flow's
parameters; tasks and ``compute/`` pass it on unchanged, and every worker (a Ray Train DDP
worker or a Tune trial training in its own process) receives it inside a ``LoopConfig`` with
one trial's ``Hyperparameters``. The names of the hyperparameters and of the per-epoch
metrics are defined here once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from core.settings import TrainSettings


class Hyperparameters(BaseModel):
    """One trial's hyperparameters (what Ray Tune searches)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = Field(gt=0)
    width: int = Field(ge=1)
    depth: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    embedding_dim: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    weight_decay: float = Field(ge=0)

    def architecture(self) -> dict[str, Any]:
        """The ``ModelSpec`` fields among them."""
        return self.model_dump(include={"width", "depth", "dropout", "embedding_dim"})


HYPERPARAMETERS: tuple[str, ...] = tuple(Hyperparameters.model_fields)

# What each epoch reports besides its number: the training loss and, per task, the
# validation metrics. Tune and early stopping select on SELECTION_METRIC (lower is better).
SELECTION_METRIC = "val_loss"
VALIDATION_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("val_loss", "val_auc"),
    "regression": ("val_loss", "val_rmse"),
}
EPOCH_METRICS: tuple[str, ...] = ("train_loss", *dict.fromkeys(m for ms in VALIDATION_METRICS.values() for m in ms))


class FaultInjection(BaseModel):
    """For tests of recovery: the last worker dies once, at the start of ``at_epoch``, unless
    ``marker`` exists (it writes it first). Not a command-line option."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at_epoch: int = Field(ge=0)
    marker: str
    delay_s: float = Field(4.0, ge=0, description="Wait first, so the previous epoch's report lands.")


class TrainingConfig(BaseModel):
    """How a model is trained: budget, workers, devices, seed, recovery and scheduler."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trials: int = Field(ge=1)
    max_epochs: int = Field(ge=1)
    grace_period: int = Field(1, ge=1)
    num_workers: int = Field(1, ge=1)
    max_failures: int = Field(2, ge=0)
    seed: int = 13
    use_gpu: bool = False
    scheduler: Literal["asha", "fifo"] = "asha"
    selection_tolerance: float = Field(0.002, ge=0, description="A family listed earlier wins when its best "
                                       "validation loss is within this fraction of the best.")
    fault: FaultInjection | None = None

    @classmethod
    def from_settings(cls, train: TrainSettings, **overrides: Any) -> TrainingConfig:
        """The settings' training budget with the given overrides (None values ignored)."""
        values = {"trials": train.trials, "max_epochs": train.max_epochs, "grace_period": train.grace_period,
                  "num_workers": train.num_workers, "max_failures": train.max_failures, "seed": train.seed,
                  "selection_tolerance": train.selection_tolerance}
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["grace_period"] = min(values["grace_period"], values["max_epochs"])
        return cls(**values)


class LoopConfig(BaseModel):
    """What the epoch loop gets on every worker, besides the data and the hyperparameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    training: TrainingConfig
    data_spec: dict[str, Any] = Field(description="The ModelSpec fields fixed by the data.")
    epochs: int = Field(ge=1)
    threads_per_worker: int = Field(1, ge=1)
    pg_file: str | None = Field(None, description="Where a Tune trial's Train group records its "
                                "placement group (freed when Tune stops the trial).")
