"""Model families that misbehave on purpose, for the rollout tests: the network of
``tabular_net`` that answers 50 ms slower, or fails every twentieth call. A registered version's
``model_spec.json`` names one by ``family_path``; the service imports it from the checkout."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import numpy as np

from core.families.tabular_net import TabularNetFamily


class SlowNet(TabularNetFamily):
    """The same scores, 50 ms later."""

    def predict(self, model: Any, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        time.sleep(0.050)
        return super().predict(model, categorical, numeric)


_calls = itertools.count(1)
_calls_lock = threading.Lock()


class FlakyNet(TabularNetFamily):
    """The same scores, but every twentieth call fails: 5% of calls in any window, not 5% on
    average (a random 5% gave one failure in 101 calls once, under the rollout's 1% limit, and
    the rollback came a step late)."""

    def predict(self, model: Any, categorical: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        with _calls_lock:
            call = next(_calls)
        if call % 20 == 0:
            raise RuntimeError("FlakyNet: failed on purpose (every 20th call)")
        return super().predict(model, categorical, numeric)
