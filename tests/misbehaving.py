"""Model families that misbehave on purpose, for the rollout tests: the network of
``tabular_net`` that answers 50 ms slower, or fails one call in twenty. A registered version's
``model_spec.json`` names one by ``family_path``; the service imports it from the checkout."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from core.families.tabular_net import TabularNetFamily


class SlowNet(TabularNetFamily):
    """The same scores, 50 ms later."""

    def predict(self, model: Any, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        time.sleep(0.050)
        return super().predict(model, categorical, numeric)


class FlakyNet(TabularNetFamily):
    """The same scores, but one call in twenty fails."""

    def predict(self, model: Any, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        if random.random() < 0.05:
            raise RuntimeError("FlakyNet: failed on purpose (1 call in 20)")
        return super().predict(model, categorical, numeric)
