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
forecaster   `(history: Sequence[np.ndarray], decay: float) -> np.ndarray`
             One layer's observed load (tokens per expert per step), oldest first -> the load
             the placer plans for. The re-plan loop calls it with [previous forecast, newest
             observation] (or [first observation]); decay = placer.ema_decay.
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

from typing import Optional, Protocol, Sequence

import numpy as np

# The annotations below name moepipe's types as strings and import nothing: the registry sits
# below every layer it serves (tests/test_layers.py). PlacementInputs:
# moepipe.placement.placers.inputs; Plan: moepipe.placement.plan; MoEConfig, MoepipeConfig:
# moepipe.config; nn.Module: torch.


class Placer(Protocol):
    def __call__(self, inputs: "PlacementInputs", replica_slots: int, current: Optional["Plan"]) -> "Plan": ...


class Forecaster(Protocol):
    def __call__(self, history: Sequence[np.ndarray], decay: float) -> np.ndarray: ...


class Workload(Protocol):
    def __call__(self, step: int, layer: int, num_experts: int, ep: int, strength: float, period: int,
                 burst_every: int, seed: int) -> np.ndarray: ...


class MoEBackend(Protocol):
    def build(self, d_model: int, cfg: "MoEConfig") -> "nn.Module": ...

    def check_config(self, cfg: "MoepipeConfig") -> None: ...
