"""The reference placers (static, balance_by_time, eplb) and the pieces topo shares with them:
per-(layer, pipeline rank) times and the memory-capped partition search."""
from __future__ import annotations

from typing import Optional

import numpy as np

from moepipe.placement.plan import Plan, static_plan
from moepipe.placement.placers.evaluate import Evaluator
from moepipe.placement.placers.inputs import BYTES_PER_PARAM_TRAIN, PlacementInputs
from moepipe.placement.placers.packing import eplb_batch, node_groups
from moepipe.placement.placers.partition import minmax_partition


def static(inputs: PlacementInputs) -> Plan:
    s = inputs.spec
    return static_plan(s.n_layers, s.moe_layers, s.num_experts, inputs.pp, inputs.ep, inputs.virtual_stages, inputs.style, inputs.dp)


def slots_per_rank(inputs: PlacementInputs, replica_slots: int) -> int:
    return -(-inputs.spec.num_experts // inputs.ep) + max(0, int(replica_slots))


def member_nodes(ev: Evaluator, p: int) -> tuple[int, ...]:
    """Node of each EP member of pipeline rank p (dp replica 0; replicas repeat the layout)."""
    return tuple(int(x) for x in ev.topo.node_of[ev.grid[p, 0]])


def layer_cost(ev: Evaluator, routed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cost [L, pp]: seconds per microbatch of each block on each pipeline rank, forward and
    backward, slowest member + all-to-alls; extra [S]: embedding and head per stage)."""
    comp, a2a = ev.layer_times(routed)  # [L, pp, 3, dp], [L, pp, dp]
    c = comp.max(-1)  # [L, pp, 3]
    a = a2a.max(-1)  # one phase's dispatch + combine
    f, b, w = c[..., 0] + a, c[..., 1] + a, c[..., 2]
    if ev.spec.activation_checkpointing:
        b = b + f
    emb, head = ev.extras()
    S, s2r = ev.n_stages, ev.s2r
    extra = np.zeros(S)
    extra[0] += emb[s2r[0]].max(-1).sum()
    extra[-1] += head[s2r[-1]].max(-1).sum()
    return f + b + w, extra


def partition(ev: Evaluator, cost: np.ndarray, extra: np.ndarray, held: Optional[np.ndarray], routed: np.ndarray) -> list[tuple[int, int]]:
    """Min-max contiguous partition of blocks over the stages (each on its fixed pipeline rank),
    with each stage's parameters + AdamW state + activations within 1/v of its rank's memory.
    `held` [L, ep]: experts each EP member holds per block (None: ceil(E/ep))."""
    spec, s2r, S = ev.spec, ev.s2r, ev.n_stages
    C = cost[:, s2r].T  # [S, L]
    L = spec.n_layers
    if held is None:
        held = np.zeros((L, ev.inputs.ep))
        held[ev.moe] = -(-spec.num_experts // ev.inputs.ep)
    inflight = ev.inflight_estimate()
    stage_layers = [(i, i + 1) for i in range(L)]  # per-layer activation bytes per microbatch
    act_l = ev.act_bytes_per_mb(stage_layers, routed)  # [L, ep] (+ head on the last entry)
    act_l[-1] -= spec.head_act_elems * ev.T_e * spec.dtype_bytes
    per_layer = BYTES_PER_PARAM_TRAIN * (ev.dense_params[:, None] + ev.expert_params[:, None] * held)
    mem = np.array([(per_layer + act_l * inflight[s]).max(1) for s in range(S)])  # [S, L] (worst member)
    mem_extra = np.zeros(S)
    mem_extra[0] += BYTES_PER_PARAM_TRAIN * spec.embed_params
    mem_extra[-1] += BYTES_PER_PARAM_TRAIN * spec.head_params + spec.head_act_elems * ev.T_e * spec.dtype_bytes * inflight[-1]
    # A rank's memory is shared by its v stages: start uncapped; while a rank overflows, cap its
    # largest stage a little below its current size and solve again (the DP is cheap).
    rank_mem = np.array([ev.mem[ev.grid[p].ravel()].min() for p in range(ev.inputs.pp)])
    cap = np.full(S, np.inf)
    best = part = minmax_partition(C, extra)
    for _ in range(48):
        used = np.array([mem_extra[s] + mem[s, a:b].sum() for s, (a, b) in enumerate(part)])
        need = np.bincount(s2r, weights=used, minlength=ev.inputs.pp)
        if not (need > rank_mem).any():
            return part
        for p in np.flatnonzero(need > rank_mem):
            mine = [s for s in range(S) if s2r[s] == p]
            s = max(mine, key=lambda k: (used[k], -k))
            cap[s] = min(cap[s], used[s] - (need[p] - rank_mem[p]) / 2, used[s] * 0.97)
        part = minmax_partition(C, extra, mem, mem_extra, cap)
        if part is None:
            break
    return best  # nothing found that fits: the final memory check reports it


def balance_by_time(ev: Evaluator, base: Optional[Plan] = None) -> Plan:
    """Layers: min-max partition of per-block times (measured `layer_times` through the
    calibrated cost model, else analytic with the expert load), each stage's time on its
    pipeline rank's slowest device. Experts: static (`base`'s map object when given)."""
    base = ev.static_plan() if base is None else base
    routed, _ = ev._layers_of(base)
    cost, extra = layer_cost(ev, routed)
    return Plan(partition(ev, cost, extra, None, routed), base.stage_to_pp_rank, base.expert_map, base.pp, base.ep, base.dp,
                {"placer": "balance_by_time", "style": ev.inputs.style})


def eplb(ev: Evaluator, replica_slots: int) -> Plan:
    """Layers: static. Experts: DeepSeek EPLB per layer (hierarchical when the EP group spans
    nodes); the layers on EP groups of one node layout are solved in one batch."""
    base = static(ev.inputs)
    slots = slots_per_rank(ev.inputs, replica_slots)
    by_layout: dict = {}  # node layout -> (member nodes, {load bytes: row}, [(layer, row)])
    rank_layout: dict = {}  # pp rank -> (member nodes, node layout)
    for li, l in enumerate(ev.moe):
        p = base.stage_to_pp_rank[base.stage_of_layer(l)]
        if p not in rank_layout:
            nodes = member_nodes(ev, p)
            rank_layout[p] = (nodes, tuple(map(tuple, node_groups(nodes))))
        nodes, layout = rank_layout[p]
        _, rows, users = by_layout.setdefault(layout, (nodes, {}, []))
        users.append((l, rows.setdefault(ev.loads[li].tobytes(), li)))  # layers with the same load share one solve
    expert_map = {}
    for nodes, rows, users in by_layout.values():
        solved = dict(zip(rows.values(), eplb_batch(ev.loads[list(rows.values())], ev.inputs.ep, slots, nodes)))
        taken = set()
        for l, li in users:  # the first layer of a solve takes its lists, later ones a copy
            expert_map[l] = [list(r) for r in solved[li]] if li in taken else solved[li]
            taken.add(li)
    return Plan(base.stage_layers, base.stage_to_pp_rank, expert_map, base.pp, base.ep, base.dp,
                {"placer": "eplb", "style": ev.inputs.style, "replica_slots": int(replica_slots)})
