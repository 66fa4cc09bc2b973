"""What moving from one plan to another costs: bytes each device receives and the time to move
them over the topology's links."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from moepipe.placement.plan import Plan, pick_source, rank_grid
from moepipe.placement.placers.inputs import BYTES_PER_PARAM_MOVE, PlacementInputs


def _layer_rank(plan: Plan) -> np.ndarray:
    out = np.zeros(plan.n_layers, dtype=np.int64)
    for s, (a, b) in enumerate(plan.stage_layers):
        out[a:b] = plan.stage_to_pp_rank[s]
    return out


def transfers(old: Plan, new: Plan, inputs: PlacementInputs) -> list[tuple[int, int, float]]:
    """(source rank, destination rank, bytes) of every copy the move needs.

    A block whose pipeline rank changes sends its dense parameters (+ AdamW moments) to every EP
    and DP member of the new one; an expert copy on an EP rank that did not hold it (on that
    pipeline rank) is fetched once per dp replica. Sources are the old holders the runtime
    picks (`plan.pick_source`: the fastest link). Embedding and head never move: the first and
    last stage's pipeline ranks are fixed by the schedule."""
    spec = inputs.spec
    grid = rank_grid(old.pp, old.ep, old.dp)
    bw = inputs.topology.bandwidth[: old.world_size, : old.world_size]
    r_old, r_new = _layer_rank(old), _layer_rank(new)
    out = []
    for l, lay in enumerate(spec.layers):
        po, pn = int(r_old[l]), int(r_new[l])
        if po != pn:
            nbytes = float(lay.params) * BYTES_PER_PARAM_MOVE
            holders = [int(r) for r in grid[po].ravel()]
            for dst in grid[pn].ravel():
                out.append((pick_source(int(dst), holders, old, bw), int(dst), nbytes))
        if not lay.is_moe:
            continue
        # under TP (a rank is a TP group) every GPU of the group holds the expert whole: tp copies arrive
        nbytes = float(lay.expert_params) * BYTES_PER_PARAM_MOVE * inputs.topology.tp
        for x, ranks in enumerate(new.expert_map[l]):
            had = old.expert_map[l][x]
            for e in ranks:
                if po == pn and e in had:
                    continue
                for d in range(old.dp):
                    dst = int(grid[pn, d, e])
                    src = pick_source(dst, [int(grid[po, dd, h]) for dd in range(old.dp) for h in had], old, bw)
                    out.append((src, dst, nbytes))
    return out


def migration_bytes(old: Plan, new: Plan, inputs: PlacementInputs) -> np.ndarray:
    """[world] bytes each global rank receives (parameters + AdamW moments = 3 x fp32 per parameter;
    under TP each TP group, all its GPUs together)."""
    out = np.zeros(old.world_size)
    for _, dst, n in transfers(old, new, inputs):
        out[dst] += n
    return out


def migration_time_s(old: Plan, new: Plan, inputs: PlacementInputs) -> float:
    """All copies at once; each device sends and receives on one port per direction, so its
    messages serialise: time = max over devices of sum(bytes / link bandwidth) + the largest
    latency among its peers, for both its sends and its receives."""
    topo = inputs.topology
    send, recv = defaultdict(float), defaultdict(float)
    lat_s, lat_r = defaultdict(float), defaultdict(float)
    for src, dst, n in transfers(old, new, inputs):
        if src == dst:
            continue
        t = n / topo.bandwidth[src, dst]
        send[src] += t
        recv[dst] += t
        lat_s[src] = max(lat_s[src], float(topo.latency[src, dst]))
        lat_r[dst] = max(lat_r[dst], float(topo.latency[src, dst]))
    worst = [send[r] + lat_s[r] for r in send] + [recv[r] + lat_r[r] for r in recv]
    return float(max(worst, default=0.0))
