"""The layout of one training job: which blocks form each pipeline stage, which pipeline rank
holds each stage, and which expert-parallel ranks hold each expert. Shared by the runtime,
the simulator and the placers; serialised as plain JSON.

Global rank order (documented contract): ep varies fastest, then pp, then dp:

    rank = ep_rank + ep * (pp_rank + pp * dp_rank)

so an EP group (the ranks exchanging tokens every MoE layer) is a run of consecutive ranks
and lands inside one node whenever ep <= devices_per_node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Optional, Sequence

import numpy as np

from moepipe.config import ConfigError

STYLES = ("loop", "v")


@dataclass(frozen=True)
class Plan:
    stage_layers: list[tuple[int, int]]  # half-open block ranges, one per stage, in stage order
    stage_to_pp_rank: list[int]
    expert_map: dict[int, list[list[int]]]  # moe layer id -> expert -> EP ranks holding a copy
    pp: int = 1
    ep: int = 1
    dp: int = 1
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form provenance (placer name, step)

    @property
    def n_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def n_layers(self) -> int:
        return self.stage_layers[-1][1] if self.stage_layers else 0

    @property
    def world_size(self) -> int:
        return self.pp * self.ep * self.dp

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_to_pp_rank) if r == pp_rank]

    def stage_of_layer(self, layer: int) -> int:
        for s, (a, b) in enumerate(self.stage_layers):
            if a <= layer < b:
                return s
        raise IndexError(f"layer {layer} is in no stage")


# ------------------------------------------------------------------ rank mapping


def global_rank(pp_rank: int, ep_rank: int, dp_rank: int, pp: int, ep: int, dp: int = 1) -> int:
    """ep fastest, then pp, then dp (see module docstring)."""
    if not (0 <= pp_rank < pp and 0 <= ep_rank < ep and 0 <= dp_rank < dp):
        raise ValueError(f"rank coordinates (pp={pp_rank}, ep={ep_rank}, dp={dp_rank}) outside mesh ({pp}, {ep}, {dp})")
    return ep_rank + ep * (pp_rank + pp * dp_rank)


def mesh_coords(rank: int, pp: int, ep: int, dp: int = 1) -> tuple[int, int, int]:
    """Inverse of `global_rank`: (pp_rank, ep_rank, dp_rank)."""
    if not 0 <= rank < pp * ep * dp:
        raise ValueError(f"rank {rank} outside a world of {pp * ep * dp}")
    return (rank // ep) % pp, rank % ep, rank // (ep * pp)


def pick_source(dst: int, sources: list[int], plan: "Plan", bandwidth=None) -> int:
    """The holder a new copy of a state entry is fetched from, shared by the runtime's migration
    and the placers' estimate of it so the two agree: the fastest link to `dst` when
    `bandwidth` ([world, world]) is given, then a copy in dst's own data-parallel replica and EP
    rank (the same node under the usual rank order), then its replica, then the lowest rank.
    Every rank must pass the same bandwidth (or None): all derive the transfer list alone."""
    _, ep_d, dp_d = mesh_coords(dst, plan.pp, plan.ep, plan.dp)

    def key(src: int):
        _, ep_s, dp_s = mesh_coords(src, plan.pp, plan.ep, plan.dp)
        return (0.0 if bandwidth is None else -float(bandwidth[src, dst]), dp_s != dp_d, ep_s != ep_d, src)

    return min(sources, key=key)


def rank_grid(pp: int, ep: int, dp: int = 1):
    """numpy int array [pp, dp, ep] of global ranks (handy for vectorised costs)."""
    import numpy as np

    p, d, e = np.meshgrid(np.arange(pp), np.arange(dp), np.arange(ep), indexing="ij")
    return e + ep * (p + pp * d)


# ------------------------------------------------------------------ construction


def stage_assignment(pp: int, virtual_stages: int = 1, style: str = "loop") -> list[int]:
    """pp rank of each of pp*virtual_stages stages.

    loop: stage s -> s % pp (interleaved 1F1B / zero bubble). v: ranks go down then back up,
    0..pp-1, pp-1..0, ... (ZB-V, DualPipeV), so the first and last stage share rank 0.
    """
    if style not in STYLES:
        raise ConfigError(f"plan style={style!r} is not known: choose one of {', '.join(STYLES)}")
    out = []
    for s in range(pp * virtual_stages):
        chunk, i = divmod(s, pp)
        out.append(i if style == "loop" or chunk % 2 == 0 else pp - 1 - i)
    return out


def stage_pp_ranks(plan: "Plan", stage: int, chains: int = 1) -> list[int]:
    """The pp ranks holding plan stage `stage`: its own, and with two chains (a bidirectional
    schedule: chimera) also the mirrored rank pp-1-r, where the second model replica runs it.
    The layer split and the expert map apply to both replicas."""
    r = plan.stage_to_pp_rank[stage]
    return [r] if chains == 1 else sorted({r, plan.pp - 1 - r})


def chain_stages(plan: "Plan", pp_rank: int, chains: int = 1) -> dict[int, int]:
    """Executed stage id -> plan stage for the stages pipeline rank `pp_rank` runs: plan stage
    s itself (chain 0) and, with two chains, stage n_stages + s (the second replica) where
    `stage_pp_ranks` puts it."""
    n = plan.n_stages
    out = {s: s for s in plan.stages_of_rank(pp_rank)}
    if chains == 2:
        out.update({n + s: s for s in range(n) if plan.pp - 1 - plan.stage_to_pp_rank[s] == pp_rank})
    return dict(sorted(out.items()))


def even_split(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous half-open ranges; the first n_items % n_parts parts take one extra item."""
    q, r = divmod(n_items, n_parts)
    out, a = [], 0
    for i in range(n_parts):
        b = a + q + (1 if i < r else 0)
        out.append((a, b))
        a = b
    return out


def static_plan(
    n_layers: int,
    moe_layer_ids: Sequence[int],
    num_experts: int,
    pp: int = 1,
    ep: int = 1,
    virtual_stages: int = 1,
    style: str = "loop",
    dp: int = 1,
) -> Plan:
    """Even layer split over pp*virtual_stages stages; experts in contiguous blocks over EP ranks."""
    n_stages = pp * virtual_stages
    if n_stages > n_layers:
        raise ConfigError(f"parallel.pp*schedule.virtual_stages={n_stages} > model.n_layers={n_layers}: lower pp or virtual_stages")
    if num_experts and ep > num_experts:
        raise ConfigError(f"parallel.ep={ep} > moe.num_experts={num_experts}: every EP rank needs an expert; lower parallel.ep")
    blocks = even_split(num_experts, ep) if num_experts else []
    owner = [r for r, (a, b) in enumerate(blocks) for _ in range(a, b)]
    return Plan(
        stage_layers=even_split(n_layers, n_stages),
        stage_to_pp_rank=stage_assignment(pp, virtual_stages, style),
        expert_map={int(l): [[owner[e]] for e in range(num_experts)] for l in moe_layer_ids},
        pp=pp,
        ep=ep,
        dp=dp,
        meta={"placer": "static", "style": style},
    )


# ------------------------------------------------------------------ validation and queries


def validate_plan(
    plan: Plan, n_layers: Optional[int] = None, moe_layer_ids: Optional[Sequence[int]] = None, num_experts: Optional[int] = None
) -> Plan:
    """Raise ConfigError (one line) unless the plan is a consistent layout; return it."""
    if plan.pp < 1 or plan.ep < 1 or plan.dp < 1:
        raise ConfigError(f"plan.pp/ep/dp=({plan.pp}, {plan.ep}, {plan.dp}) must be >= 1: fix the mesh sizes")
    if not plan.stage_layers:
        raise ConfigError("plan.stage_layers is empty: give at least one (start, end) block range")
    expect = 0
    for s, (a, b) in enumerate(plan.stage_layers):
        if a != expect or b <= a:
            raise ConfigError(
                f"plan.stage_layers[{s}]=({a}, {b}) breaks the cover: stages must be non-empty, contiguous and start at {expect}"
            )
        expect = b
    if n_layers is not None and expect != n_layers:
        raise ConfigError(f"plan.stage_layers ends at {expect} but model.n_layers={n_layers}: the last stage must end at n_layers")
    if len(plan.stage_to_pp_rank) != plan.n_stages:
        raise ConfigError(
            f"plan.stage_to_pp_rank has {len(plan.stage_to_pp_rank)} entries for {plan.n_stages} stages: give one pp rank per stage"
        )
    bad = [r for r in plan.stage_to_pp_rank if not 0 <= r < plan.pp]
    if bad:
        raise ConfigError(f"plan.stage_to_pp_rank contains {bad[0]} outside [0, pp={plan.pp}): use ranks 0..pp-1")
    missing = sorted(set(range(plan.pp)) - set(plan.stage_to_pp_rank))
    if missing:
        raise ConfigError(f"plan.stage_to_pp_rank leaves pp rank {missing[0]} without a stage: every pipeline rank needs one")
    if moe_layer_ids is not None and sorted(plan.expert_map) != sorted(int(l) for l in moe_layer_ids):
        raise ConfigError(
            f"plan.expert_map covers layers {sorted(plan.expert_map)} but the MoE layers are {sorted(moe_layer_ids)}: "
            "give an entry for each MoE layer"
        )
    for layer, experts in plan.expert_map.items():
        if num_experts is not None and len(experts) != num_experts:
            raise ConfigError(f"plan.expert_map[{layer}] has {len(experts)} experts but moe.num_experts={num_experts}: list every expert")
        if _holders_valid(experts, plan.ep):  # the checks below, vectorised; they run (and name the fault) only when it fails
            continue
        for e, ranks in enumerate(experts):
            if not ranks:
                raise ConfigError(f"plan.expert_map[{layer}][{e}] is empty: every expert needs at least one EP rank")
            if len(set(ranks)) != len(ranks) or any(not 0 <= r < plan.ep for r in ranks):
                raise ConfigError(
                    f"plan.expert_map[{layer}][{e}]={list(ranks)} needs distinct EP ranks in [0, ep={plan.ep}): fix the replica list"
                )
        if plan.ep > 1:
            empty = sorted(set(range(plan.ep)) - {r for rs in experts for r in rs})
            if empty:
                raise ConfigError(f"plan.expert_map[{layer}] leaves EP rank {empty[0]} without experts: give every EP rank one")
    return plan


def _holders_valid(experts: Sequence[Sequence[int]], ep: int) -> bool:
    """True when one layer's holder lists pass validate_plan's per-expert checks (each non-empty,
    distinct integer EP ranks in [0, ep); with ep > 1 every rank holds an expert), for all experts
    at once. False when any fails or an entry is not an integer: the caller's loop then finds it."""
    try:
        lens = np.fromiter(map(len, experts), dtype=np.int64, count=len(experts))
        flat = list(chain.from_iterable(experts))
    except TypeError:
        return False
    if not all(issubclass(t, (int, np.integer)) for t in set(map(type, flat))):
        return False
    if not len(lens) or lens.min() < 1:
        return False
    try:
        r = np.array(flat, dtype=np.int64)
    except OverflowError:
        return False
    if r.min() < 0 or r.max() >= ep:
        return False
    e = np.repeat(np.arange(len(lens)), lens)
    key = np.sort(e * ep + r)
    if (key[1:] == key[:-1]).any():  # an expert listing one rank twice
        return False
    return ep == 1 or bool((np.bincount(r, minlength=ep) > 0).all())


def experts_on_rank(plan: Plan, layer: int, ep_rank: int) -> list[int]:
    """Experts of `layer` with a copy on `ep_rank`, ascending."""
    return [e for e, ranks in enumerate(plan.expert_map[layer]) if ep_rank in ranks]


# ------------------------------------------------------------------ JSON


def to_json(plan: Plan, indent: Optional[int] = None) -> str:
    return json.dumps(
        {
            "version": 1,
            "pp": plan.pp,
            "ep": plan.ep,
            "dp": plan.dp,
            "stage_layers": [list(r) for r in plan.stage_layers],
            "stage_to_pp_rank": list(plan.stage_to_pp_rank),
            "expert_map": {str(k): [list(r) for r in v] for k, v in sorted(plan.expert_map.items())},
            "meta": plan.meta,
        },
        indent=indent,
    )


def from_json(text: str) -> Plan:
    d = json.loads(text)
    if d.get("version", 1) != 1:
        raise ConfigError(f"plan version={d.get('version')} is not supported: write it with this moepipe")
    return Plan(
        stage_layers=[(int(a), int(b)) for a, b in d["stage_layers"]],
        stage_to_pp_rank=[int(r) for r in d["stage_to_pp_rank"]],
        expert_map={int(k): [[int(r) for r in rs] for rs in v] for k, v in d["expert_map"].items()},
        pp=int(d["pp"]),
        ep=int(d["ep"]),
        dp=int(d.get("dp", 1)),
        meta=dict(d.get("meta", {})),
    )
