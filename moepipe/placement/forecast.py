"""Load forecasts: one layer's observed expert load, oldest first -> the load the placer plans
for. Registered as forecasters `ema` and `last` (placer.forecast); the interface is in
moepipe.plugins.interfaces."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def ema(history: Sequence[np.ndarray], decay: float) -> np.ndarray:
    """Exponential moving average folded over `history`, oldest first: the first entry is taken
    as is, each later one mixed in with weight 1 - decay (decay = placer.ema_decay). Fed
    [previous forecast, newest observation], it is the runtime's O(1) per-step update."""
    out = np.array(history[0], dtype=np.float64, copy=True)
    for x in history[1:]:
        out = decay * out + (1 - decay) * x
    return out


def last(history: Sequence[np.ndarray], decay: float) -> np.ndarray:
    """The newest observation: no smoothing (a placer that chases every change)."""
    return np.array(history[-1], dtype=np.float64, copy=True)


def forecast(name: str, history: Sequence[np.ndarray], decay: float) -> np.ndarray:
    """The forecaster `name` (a built-in, an import path or a registered plug-in) applied to `history`."""
    from moepipe.plugins.registry import resolve

    return resolve("forecaster", name)(history, decay)
