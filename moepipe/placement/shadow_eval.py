"""The fast path in the simulator (issue 15): a plan's iteration time with per-step shadows of
hot experts, charged as the runtime runs them (moepipe/model/shadow_exchange.py).

Per step, each MoE layer's shadows come from a load the step has not seen yet (the runtime uses
the previous step's counts): `choose_for_plan` runs `shadows.choose_shadows` per MoE layer on
its EP group (data-parallel replica 0; the replicas of a plan share its layout). The step then
costs

  the simulator's iteration time of the plan whose expert map lists the shadows as copies
  (`shadows.shadowed_expert_map`: compute and all-to-all with the shadows), less that plan's
  gradient all-reduce, plus the plan's own (shadows join no all-reduce: the homes do)
  + per pipeline rank, one weight all-to-all (homes -> shadows) and one gradient all-to-all
  back carrying all of its MoE layers' shadows (the runtime's one exchange per step each way),
  on the EP group's links; the pipeline ranks' exchanges run in parallel (the slowest counts)
    and are not overlapped with compute.

Interfaces:
  choose_for_plan(ev, plan, load, slots) -> {layer: {expert: shadow EP ranks}}
  step_transfer_s(ev, plan, shadows_by_layer) -> seconds per step
  shadowed_iteration_s(ev, plan, shadows_by_layer) -> seconds per step
  time_with_shadows(ev, plan, slots) -> seconds per step with the shadows the runtime would
      choose for the evaluator's load (the re-plan decision's score when shadows are on)
where `ev` is a `placers.Evaluator` (its topology, mesh grid, cost model and microbatches).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from moepipe.placement.placers.evaluate import Evaluator
from moepipe.placement.plan import Plan
from moepipe.placement.shadows import ShadowLayer, choose_shadows, layer_setup, shadowed_expert_map, transfer_matrix


def _setups(ev: Evaluator, plan: Plan) -> dict[int, ShadowLayer]:
    """Each MoE layer's decision setup on its pipeline rank's EP group (replica 0), cached on the
    evaluator per (layer, pipeline rank)."""
    cache = ev.__dict__.setdefault("_shadow_setups", {})
    out = {}
    for l in ev.spec.moe_layers:
        p = plan.stage_to_pp_rank[plan.stage_of_layer(l)]
        if (l, p) not in cache:
            cache[l, p] = layer_setup(ev.cm, ev.topo, ev.grid[p, 0], l, ev.inputs.microbatches)
        out[l] = cache[l, p]
    return out


def choose_for_plan(ev: Evaluator, plan: Plan, load: Mapping[int, Any], slots: int, exact: bool = False) -> dict[int, dict]:
    """Every MoE layer's shadows for `plan` from `load` (layer -> [E] or [ep, E] counts), at most
    `slots` per EP rank per layer; the runtime's decision (exact=False) unless asked."""
    setups = _setups(ev, plan)
    return {l: dict(choose_shadows(load[l], plan.expert_map[l], setups[l], slots, exact=exact).shadows) for l in ev.spec.moe_layers if l in load}


def step_transfer_s(ev: Evaluator, plan: Plan, shadows_by_layer: Optional[Mapping[int, Mapping]]) -> float:
    """Per-step seconds of the shadows' weight broadcast and gradient return: per pipeline rank,
    all its layers' shadows in one all-to-all each way (the runtime's exchange); ranks in parallel."""
    sb = shadows_by_layer or {}
    setups = _setups(ev, plan)
    worst = 0.0
    for p in range(plan.pp):
        w = g = None
        for l in ev.spec.moe_layers:
            if plan.stage_to_pp_rank[plan.stage_of_layer(l)] != p or not sb.get(l):
                continue
            m = transfer_matrix(plan.expert_map[l], sb[l], plan.ep)
            w = m * setups[l].weight_bytes if w is None else w + m * setups[l].weight_bytes
            g = m.T * setups[l].grad_bytes if g is None else g + m.T * setups[l].grad_bytes
        if w is not None:
            group = ev.grid[p, 0]
            worst = max(worst, float(ev.topo.all_to_all_time(w, group) + ev.topo.all_to_all_time(g, group)))
    return worst


def shadowed_iteration_s(ev: Evaluator, plan: Plan, shadows_by_layer: Optional[Mapping[int, Mapping]]) -> float:
    """The plan's iteration time with these shadows (module docstring); without any, the
    Evaluator's own."""
    sb = shadows_by_layer or {}
    if not any(sb.values()):
        return ev.evaluate(plan).iteration_time_s
    aug = Plan(plan.stage_layers, plan.stage_to_pp_rank, shadowed_expert_map(plan.expert_map, sb), plan.pp, plan.ep, plan.dp)
    pipeline = ev.evaluate(aug).iteration_time_s - ev.grad_sync(aug)
    return pipeline + ev.grad_sync(plan) + step_transfer_s(ev, plan, sb)


def decision_load(ev: Evaluator, layer: int) -> np.ndarray:
    """The counts the runtime would decide layer `layer`'s shadows from, as the evaluator's
    inputs describe them: [ep, E] tokens per (source EP rank, expert) when the origins are
    known (each expert's load split over sources in the origins' proportions), else [E]."""
    inp = ev.inputs
    E = ev.spec.num_experts
    load = np.ones(E) if inp.expert_load is None else np.asarray(inp.expert_load[layer], dtype=np.float64)
    o = None if inp.origins is None else inp.origins.get(layer)
    if o is None:
        return load
    o = np.asarray(o, dtype=np.float64)
    col = o.sum(0)
    share = np.divide(o, col, out=np.full_like(o, 1.0 / o.shape[0]), where=col > 0)
    return share * load


def time_with_shadows(ev: Evaluator, plan: Plan, slots: int) -> float:
    """The plan's iteration time when the runtime shadows hot experts every step (at most
    `slots` per EP rank per MoE layer) under the evaluator's load: the shadows the runtime's
    decision picks for that load, charged by `shadowed_iteration_s`."""
    load = {l: decision_load(ev, l) for l in ev.spec.moe_layers}
    return shadowed_iteration_s(ev, plan, choose_for_plan(ev, plan, load, slots))
