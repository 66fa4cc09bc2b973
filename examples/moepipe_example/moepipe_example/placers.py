"""greedy: layers as the static plan splits them; each MoE layer's experts packed onto the EP
ranks longest-processing-time first (heaviest expert to the least-loaded rank with a free slot).

A placer is a pure function (inputs, replica_slots, current) -> Plan. This one makes no
replicas, so it stays within ceil(E/ep) slots per rank whatever replica_slots allows.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from moepipe.placement.placers import PlacementInputs, load_fractions
from moepipe.placement.plan import Plan, static_plan


def pack(load: np.ndarray, ep: int) -> list[list[int]]:
    """expert -> [EP rank]: heaviest first onto the rank with the least load (then the fewest
    experts, then the lowest index), at most ceil(E/ep) experts per rank."""
    E = len(load)
    cap = -(-E // ep)
    rank_load, count = np.zeros(ep), np.zeros(ep, dtype=int)
    owner = [0] * E
    for e in sorted(range(E), key=lambda e: (-load[e], e)):
        r = min((r for r in range(ep) if count[r] < cap), key=lambda r: (rank_load[r], count[r], r))
        owner[e] = r
        rank_load[r] += load[e]
        count[r] += 1
    return [[r] for r in owner]


def greedy(inputs: PlacementInputs, replica_slots: int, current: Optional[Plan]) -> Plan:
    s = inputs.spec
    base = static_plan(s.n_layers, s.moe_layers, s.num_experts, inputs.pp, inputs.ep, inputs.virtual_stages, inputs.style, inputs.dp)
    shares = load_fractions(inputs)  # [MoE layers, E], rows sum to 1 (uniform without measured load)
    expert_map = {layer: pack(shares[i], inputs.ep) for i, layer in enumerate(s.moe_layers)}
    return Plan(base.stage_layers, base.stage_to_pp_rank, expert_map, base.pp, base.ep, base.dp, {"placer": "greedy"})
