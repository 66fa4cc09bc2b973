"""What every placer reads: the job (topology, model, mesh, schedule) and the measured
statistics (expert load, layer times), plus the cost model calibrated to those statistics."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np

from moepipe.config import ConfigError, MoepipeConfig, moe_layer_ids
from moepipe.placement.cost_model import CostModel
from moepipe.placement.model_spec import ModelSpec, build_model_spec
from moepipe.placement.topology import Topology, from_config, tp_groups

BYTES_PER_PARAM_TRAIN = 16  # fp32 param + grad + two AdamW moments: what a device must hold
BYTES_PER_PARAM_MOVE = 12  # param + two moments move on migration; gradients are recomputed


@dataclass
class PlacementInputs:
    topology: Topology  # one Device per global rank (rank = ep + ep*(pp + pp*dp)); under TP one per TP group (tp_groups)
    spec: ModelSpec
    cost_model: CostModel
    pp: int
    ep: int
    dp: int
    virtual_stages: int
    style: str  # "loop" or "v": stage -> pp rank is fixed by the schedule
    schedule: str
    microbatches: int
    expert_load: Optional[dict[int, np.ndarray]] = None  # moe layer -> tokens per expert per step (EMA); None = uniform
    layer_times: Optional[np.ndarray] = None  # seconds per block per step (fwd+bwd) on a nominal device; None = cost model
    origins: Optional[dict[int, np.ndarray]] = None  # moe layer -> [ep, E] tokens per source EP rank per expert (EMA); None = evenly spread

    @property
    def world(self) -> int:
        return self.pp * self.ep * self.dp

    @property
    def moe_layers(self) -> list[int]:
        return list(self.spec.moe_layers)


def inputs_from_config(
    cfg: MoepipeConfig, topology: Optional[Topology] = None, expert_load: Optional[dict] = None, layer_times: Optional[np.ndarray] = None,
    origins: Optional[dict] = None,
) -> PlacementInputs:
    """The placer inputs of a validated config (the simulator's conventions for dtype and cost model).

    Under tensor parallelism (parallel.tp > 1) `topology` may be per GPU (pp*ep*dp*tp devices, or
    the config's) or already grouped: the placers see one device per TP group (`tp_groups`)."""
    from moepipe.sim.schedules import plan_style

    par = cfg.parallel
    tp = int(getattr(par, "tp", 1))
    ws = par.pp * par.ep * par.dp  # placement ranks: TP groups
    topo = from_config(cfg.topology, ws * tp) if topology is None else topology
    topo = tp_groups(topo, tp, ws) if tp > 1 and topo.tp != tp else topo
    if topo.n_devices < ws:
        raise ConfigError(f"parallel.pp*ep*dp={ws} > topology devices={topo.n_devices}: pick a larger topology")
    dtype = {"fp32": 4, "bf16": 2}.get(cfg.train.dtype) or (4 if topo.devices[0].kind == "cpu" else 2)
    spec = build_model_spec(cfg.model, cfg.moe, cfg.train, cfg.schedule.microbatches, cfg.parallel.dp, dtype_bytes=dtype)
    cm = CostModel(spec, efficiency=cfg.sim.efficiency, profile=cfg.sim.profile, a2a=cfg.parallel.a2a,
                   sequence_parallel=bool(getattr(par, "sp", False)))
    assert spec.moe_layers == moe_layer_ids(cfg.model, cfg.moe)
    return PlacementInputs(
        topology=topo, spec=spec, cost_model=cm, pp=cfg.parallel.pp, ep=cfg.parallel.ep, dp=cfg.parallel.dp,
        virtual_stages=cfg.schedule.virtual_stages, style=plan_style(cfg.schedule.name), schedule=cfg.schedule.name,
        microbatches=cfg.schedule.microbatches, expert_load=expert_load, layer_times=layer_times, origins=origins,
    )


def load_fractions(inputs: PlacementInputs) -> np.ndarray:
    """[n_moe, E] share of each layer's token-expert assignments per expert (rows sum to 1)."""
    spec = inputs.spec
    n, E = len(spec.moe_layers), spec.num_experts
    if not n:
        return np.zeros((0, max(E, 1)))
    if inputs.expert_load is None:
        return np.full((n, E), 1.0 / E)
    rows = []
    for l in spec.moe_layers:
        if l not in inputs.expert_load:
            raise ConfigError(f"expert_load has no entry for MoE layer {l}: give tokens per expert for every MoE layer {spec.moe_layers}")
        c = np.asarray(inputs.expert_load[l], dtype=np.float64)
        if c.shape != (E,) or not np.isfinite(c).all() or (c < 0).any():
            raise ConfigError(f"expert_load[{l}] has shape {c.shape} or a negative/non-finite count: give {E} counts >= 0")
        rows.append(c / c.sum() if c.sum() > 0 else np.full(E, 1.0 / E))
    return np.array(rows)


def routing_of(inputs: PlacementInputs) -> Optional[np.ndarray]:
    """The routing argument for the simulator (None = uniform)."""
    return None if inputs.expert_load is None else load_fractions(inputs)


def origins_of(inputs: PlacementInputs) -> Optional[dict[int, np.ndarray]]:
    """The origins argument for the simulator (None = tokens start evenly spread)."""
    return None if inputs.origins is None else dict(inputs.origins)


def origin_fractions(inputs: PlacementInputs) -> Optional[np.ndarray]:
    """[n_moe, ep, E] share of each expert's tokens starting on each EP rank, or None (even)."""
    from moepipe.placement.cost_model import origin_shares

    return origin_shares(inputs.origins, inputs.spec.moe_layers, inputs.ep, inputs.spec.num_experts) if inputs.spec.moe_layers else None


def effective_cost_model(inputs: PlacementInputs) -> CostModel:
    """The cost model, rescaled per block to the measured `layer_times` when given.

    layer_times[l] = seconds block l (non-expert part and experts, all tokens of one pipeline
    replica's step: forward + backward) takes on a device of the topology's first device's
    tflops at speed 1. Each block's dense and expert work are scaled by measured / modelled,
    so the split between them and between phases keeps the analytic ratios.
    """
    cm = inputs.cost_model
    if inputs.layer_times is None:
        return cm
    spec = cm.spec
    lt = np.asarray(inputs.layer_times, dtype=np.float64)
    if lt.shape != (spec.n_layers,) or not np.isfinite(lt).all() or (lt <= 0).any():
        raise ConfigError(f"layer_times has shape {lt.shape} or a value <= 0: give {spec.n_layers} positive seconds, one per block")
    tokens = spec.tokens_per_microbatch * inputs.microbatches
    model = (cm.dense_work.sum(1) + cm.expert_work.sum(1) * spec.top_k) * tokens
    rate = inputs.topology.devices[0].tflops * 1e12 * cm.efficiency
    scale = lt * rate / np.where(model > 0, model, 1.0)
    out = copy.copy(cm)
    out.dense_work = cm.dense_work * scale[:, None]
    out.expert_work = cm.expert_work * scale[:, None]
    return out
