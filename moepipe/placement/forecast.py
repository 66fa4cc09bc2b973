"""Load forecasts: one MoE layer's observed expert load (tokens per expert per step, oldest
first) -> the load of the next `horizon` steps, the interval one plan will run.

A forecaster (plug-in interface in moepipe.plugins.interfaces) is a pure function

    forecaster(history: np.ndarray [T, E], horizon: int, decay: float) -> Forecast | np.ndarray [E]

and a `Forecast` carries the mean load over the horizon plus, optionally, a few weighted
scenarios (load vectors the interval may bring), for placers that plan for more than the mean.
Built-ins (placer.forecast):

  last      the newest observation
  ema       exponential moving average (decay = placer.ema_decay); the re-plan loop keeps its
            O(1) running form over every step (ema_update), bit-identical to earlier runs
  window    mean of the history window (placer.forecast_window steps)
  trend     per-expert least-squares line over the window, extrapolated over the horizon,
            clipped at 0 and rescaled to the extrapolated total
  periodic  finds the lag p and circular expert shift d with x_t ~ roll(x_{t-p}, d) (a hot spot
            that moves by d experts every p steps; d = 0 is plain periodicity, (1, 0) a steady
            load) and rolls the history forward with that rule
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

MAX_SCENARIOS = 8  # scenarios a built-in returns at most: a robust placer evaluates each one


@dataclass(frozen=True)
class Forecast:
    """The predicted load of the next interval (tokens per expert per step). `scenarios` [S, E]
    with `weights` [S] (>= 0, sum 1) are load vectors the interval may bring, e.g. its steps'
    loads in order; `mean` is their weighted mean. None: only the mean is known."""

    mean: np.ndarray
    scenarios: Optional[np.ndarray] = None
    weights: Optional[np.ndarray] = None


History = Union[np.ndarray, Sequence[np.ndarray]]


def as_history(history: History) -> np.ndarray:
    """The history as a fresh float64 [T, E] array (T >= 1); a forecaster never writes to its input."""
    x = np.array(history, dtype=np.float64, copy=True)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"history must be [T >= 1, E] tokens per expert per step, got shape {x.shape}")
    return x


def as_forecast(out: Union[Forecast, np.ndarray], num_experts: int) -> Forecast:
    """A forecaster's return value as a checked Forecast: a bare array is the mean alone."""
    if not isinstance(out, Forecast):
        out = Forecast(np.asarray(out, dtype=np.float64))
    mean = np.asarray(out.mean, dtype=np.float64)
    if mean.shape != (num_experts,) or not np.isfinite(mean).all() or (mean < 0).any():
        raise ValueError(f"forecast mean must be {num_experts} finite loads >= 0, got shape {mean.shape}")
    if out.scenarios is None:
        if out.weights is not None:
            raise ValueError("forecast weights without scenarios")
        return Forecast(mean)
    sc = np.asarray(out.scenarios, dtype=np.float64)
    w = np.asarray(out.weights if out.weights is not None else np.full(len(sc), 1.0 / max(len(sc), 1)), dtype=np.float64)
    if sc.ndim != 2 or sc.shape[1] != num_experts or len(sc) < 1 or not np.isfinite(sc).all() or (sc < 0).any():
        raise ValueError(f"forecast scenarios must be [S >= 1, {num_experts}] finite loads >= 0, got shape {sc.shape}")
    if w.shape != (len(sc),) or (w < 0).any() or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"forecast weights must be {len(sc)} values >= 0 summing to 1")
    return Forecast(mean, sc, w)


def chunked(path: np.ndarray, max_scenarios: int = MAX_SCENARIOS) -> Forecast:
    """A Forecast from per-step loads [h, E]: mean over the steps, scenarios the means of up to
    `max_scenarios` consecutive chunks, weighted by their length (so they average to the mean)."""
    chunks = np.array_split(path, min(len(path), max_scenarios))
    weights = np.array([len(c) for c in chunks], dtype=np.float64) / len(path)
    return Forecast(path.mean(axis=0), np.stack([c.mean(axis=0) for c in chunks]), weights)


# ------------------------------------------------------------------ built-in forecasters


def ema_update(prev: np.ndarray, x: np.ndarray, decay: float) -> np.ndarray:
    """One step of the exponential moving average: the arithmetic every moepipe run has used
    (the re-plan loop's running load and block-time averages), kept as is for bit-identity."""
    return decay * prev + (1 - decay) * x


def ema(history: History, horizon: int, decay: float) -> Forecast:
    """EMA folded over `history`, oldest first: the first row taken as is, each later one mixed in
    with weight 1 - decay. Fed [previous forecast, newest observation] it is one ema_update."""
    x = as_history(history)
    out = x[0]
    for row in x[1:]:
        out = ema_update(out, row, decay)
    return Forecast(out)


def last(history: History, horizon: int, decay: float) -> Forecast:
    """The newest observation: no smoothing (a placer that chases every change)."""
    return Forecast(as_history(history)[-1])


def window(history: History, horizon: int, decay: float) -> Forecast:
    """Mean of the window; scenarios: the means of consecutive stretches of it (the loads the
    recent past actually brought, for a placer that hedges against them)."""
    return chunked(as_history(history))


def trend(history: History, horizon: int, decay: float) -> Forecast:
    """Least-squares line per expert over the window, extrapolated to the next `horizon` steps.
    Each step's vector is clipped at 0 and rescaled to the extrapolated total load (the line of
    the totals, also >= 0), so a constant token count stays constant while experts drift."""
    x = as_history(history)
    T = len(x)
    if T < 2:
        return chunked(np.repeat(x, max(horizon, 1), axis=0))
    t = np.arange(T, dtype=np.float64)
    tc = t - t.mean()
    slope = tc @ (x - x.mean(axis=0)) / (tc @ tc)  # [E]
    ahead = np.arange(T, T + max(horizon, 1), dtype=np.float64) - t.mean()
    path = x.mean(axis=0) + ahead[:, None] * slope  # [h, E]
    total = np.maximum(path.sum(axis=1), 0.0)
    clipped = np.maximum(path, 0.0)
    s = clipped.sum(axis=1)
    path = np.where(s[:, None] > 0, clipped * (total / np.where(s > 0, s, 1.0))[:, None], clipped)
    return chunked(path)


def shift_errors(x: np.ndarray, max_lag: int) -> np.ndarray:
    """err[p - 1, d] = mean over t of ||x_t - roll(x_{t-p}, d)||^2 / mean ||x_t||^2, for lags
    p = 1..max_lag and circular shifts d = 0..E-1 (FFT cross-correlation: O(p T E log E))."""
    T, E = x.shape
    F = np.fft.rfft(x, axis=1)
    sq = (x * x).sum(axis=1)
    scale = max(sq.mean(), 1e-300)
    err = np.empty((max_lag, E))
    for p in range(1, max_lag + 1):
        # sum_t <x_t, roll(x_{t-p}, d)> for every d at once
        corr = np.fft.irfft((F[p:] * np.conj(F[:-p])).sum(axis=0), n=E)
        err[p - 1] = (sq[p:].sum() + sq[:-p].sum() - 2 * corr) / (T - p) / scale
    return err


def detect_shift(history: History, z: float = 4.0, margin: float = 0.02) -> tuple[int, int]:
    """The simplest (lag p, shift d) whose relation x_t ~ roll(x_{t-p}, d) explains the history
    as well as the best one up to noise: smallest p, then smallest |d| (d in (-E/2, E/2]), among
    those within `z` standard errors of the best's per-pair error (plus `margin` relative): the
    noise in token counts makes equivalent rules, e.g. (5, 2) and (10, 4), differ by chance.
    Lags need at least as many pairs as the lag (p <= T/2); with T < 3, (1, 0): a steady load."""
    x = as_history(history)
    T, E = x.shape
    if T < 3:
        return 1, 0
    err = shift_errors(x, T // 2)
    p0, d0 = np.unravel_index(np.argmin(err), err.shape)
    p0 += 1
    pair = ((x[p0:] - np.roll(x[:-p0], d0, axis=1)) ** 2).sum(axis=1) / max((x * x).sum(axis=1).mean(), 1e-300)
    se = pair.std(ddof=1) / np.sqrt(len(pair)) if len(pair) > 1 else 0.0
    tol = err[p0 - 1, d0] * (1 + margin) + z * se + 1e-9  # 1e-9: exact repeats score ~0 up to FFT round-off
    d = np.arange(E)
    signed = np.where(d > E // 2, d - E, d)
    for p in range(1, T // 2 + 1):
        ok = np.flatnonzero(err[p - 1] <= tol)
        if len(ok):
            best = ok[np.lexsort((signed[ok] < 0, np.abs(signed[ok])))[0]]
            return p, int(signed[best])
    return 1, 0  # not reached: the best itself is within tol


def shift_path(history: History, lag: int, shift: int, horizon: int, decay: float) -> np.ndarray:
    """Loads [horizon, E] of the next steps under x_t = roll(x_{t-lag}, shift): step T+k is each
    observed step T+k-j*lag rolled by j*shift, averaged with weight decay^(j - j0) from the
    newest one (j0) back, so repeats of the pattern also average the noise out."""
    x = as_history(history)
    T, E = x.shape
    e = np.arange(E)
    path = np.empty((max(horizon, 1), E))
    for k in range(len(path)):
        j = np.arange(-(-(k + 1) // lag), (T + k) // lag + 1)  # sources T+k-j*lag in [0, T)
        w = decay ** (j - j[0]).astype(np.float64)
        rows = x[(T + k - j * lag)[:, None], (e[None, :] - (j * shift)[:, None]) % E]  # roll(x_s, j*shift)
        path[k] = w @ rows / w.sum()
    return path


def periodic(history: History, horizon: int, decay: float) -> Forecast:
    """Periodic or moving hot spots: detect_shift's (lag, shift) rolled forward over the horizon
    (shift_path). A steady load gives (1, 0): the decay-weighted mean of the window."""
    x = as_history(history)
    lag, shift = detect_shift(x)
    return chunked(shift_path(x, lag, shift, horizon, decay))


def forecast(name: str, history: History, horizon: int, decay: float) -> Forecast:
    """The forecaster `name` (a built-in, an import path or a registered plug-in) applied to
    `history` [T, E] for the next `horizon` steps, as a checked Forecast."""
    from moepipe.plugins.registry import resolve

    x = as_history(history)
    return as_forecast(resolve("forecaster", name)(x, horizon, decay), x.shape[1])
