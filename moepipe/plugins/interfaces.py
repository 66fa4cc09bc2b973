"""The interface of each plug-in kind. Every built-in implements the same one; run
moepipe.plugins.conformance on your own to get the checks the built-ins pass.

placer       `(inputs: PlacementInputs, replica_slots: int, current: Plan | None) -> Plan`
             Pure: the same inputs give the same plan. The plan must cover every block, keep
             stage -> pp rank as the schedule fixes it (stage_assignment(pp, virtual_stages,
             inputs.style)), give every MoE expert at least one EP rank, use at most
             ceil(E/ep) + replica_slots expert slots per EP rank, and fit device memory.
             `current` is the running plan at a re-plan (None at start): keep it on ties.
             Optional: a keyword `evaluator` receives the caller's Evaluator for these inputs
             (moepipe.placement.placers.evaluate), so its simulations are shared; a placer may
             return `(plan, info)` with info["evaluation"] = the Evaluation of that plan.
forecaster   `(history: np.ndarray, horizon: int, decay: float) -> Forecast | np.ndarray`
             One MoE layer's observed load, float64 [T, E] (tokens per expert per step, oldest
             first, T >= 1: the newest placer.forecast_window steps) -> the load of the next
             `horizon` steps (placer.interval: the steps one plan runs). Return a
             moepipe.placement.forecast.Forecast(mean [E], scenarios [S, E] | None, weights [S] |
             None), or a bare [E] array for the mean alone: mean = the expected tokens per expert
             per step over the horizon, finite and >= 0; scenarios = a few load vectors the
             interval may bring, weights >= 0 summing to 1, mean their weighted mean. Pure (never
             writes to `history`), deterministic, and a steady load forecasts itself.
             decay = placer.ema_decay (a smoothing weight; use it or not). The re-plan loop calls
             it at each re-plan; the built-in `ema` runs instead as its O(1) running form.
workload     `(step, layer, num_experts, ep, strength, period, burst_every, seed) -> p`
             p: float array [num_experts], all > 0, summing to 1, a deterministic function of
             its arguments (every rank and every layout must see the same routing skew).
schedule     a moepipe.plugins.ScheduleSpec(torch_class, style, multi_stage): the
             torch.distributed.pipelining class (or an import path to one), the stage
             placement style "loop" | "v", and whether a rank holds several stages.
moe_backend  an object with `build(d_model: int, cfg: MoEConfig) -> nn.Module` and
             `check_config(cfg: MoepipeConfig) -> None` (raise ConfigError for options it
             cannot honour); the module must offer the MoE layer interface documented in
             moepipe.model.backends.
"""
from __future__ import annotations

from typing import Optional, Protocol, Union

import numpy as np

# The annotations below name moepipe's types as strings and import nothing: the registry sits
# below every layer it serves (tests/test_layers.py). PlacementInputs:
# moepipe.placement.placers.inputs; Plan: moepipe.placement.plan; Forecast:
# moepipe.placement.forecast; MoEConfig, MoepipeConfig: moepipe.config; nn.Module: torch.


class Placer(Protocol):
    def __call__(self, inputs: "PlacementInputs", replica_slots: int, current: Optional["Plan"]) -> "Plan": ...


class Forecaster(Protocol):
    def __call__(self, history: np.ndarray, horizon: int, decay: float) -> Union["Forecast", np.ndarray]: ...


class Workload(Protocol):
    def __call__(self, step: int, layer: int, num_experts: int, ep: int, strength: float, period: int,
                 burst_every: int, seed: int) -> np.ndarray: ...


class MoEBackend(Protocol):
    def build(self, d_model: int, cfg: "MoEConfig") -> "nn.Module": ...

    def check_config(self, cfg: "MoepipeConfig") -> None: ...
