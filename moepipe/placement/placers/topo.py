"""moepipe's topology-aware placer: layer partition and expert placement chosen together to
minimise the simulated iteration time.

1. Experts, per MoE layer and per kind of pipeline rank (ranks whose EP groups have the same
   device speeds and node layout): speed-weighted balanced packing. A member's finish time is
   (dense work + expert work of its tokens) / its FLOP/s, so a 2x faster device gets about 2x
   the tokens. Replicas of the heaviest experts go into the `replica_slots` budget; several
   replica counts are packed (none, just enough that no copy exceeds a rank's fair share, all
   slots), and, when the EP group spans nodes, a hierarchical variant packs experts onto nodes
   by node speed and keeps every replica inside its expert's node. Each is refined by moves and
   swaps on the slowest member (all layers' candidates in one batched pass); the layer keeps the variant with the least compute + all-to-all
   time (ties: fewer replicas, in-node first: cheaper to migrate and to route).
2. Layers: exact min-max partition of per-(block, pipeline rank) times that include each MoE
   block's critical path (slowest EP member + dispatch/combine), within each rank's memory.
3. Candidates (this plan, the same experts on the static split, static, balance_by_time, eplb
   at the same replica budget, and the current plan) are evaluated with the exact simulator
   costs; the best is improved by moving stage boundaries one block at a time, with a fixed
   number of evaluations that shrinks as the schedule grows. Deterministic throughout.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from moepipe.placement.plan import Plan
from moepipe.placement.placers import baselines
from moepipe.placement.placers.evaluate import Evaluator
from moepipe.placement.placers.packing import node_groups, pack, pieces_array, pieces_of, refine_batch, replicate_counts

EVAL_ACTION_BUDGET = 6000  # engine actions the boundary search may simulate (a few tenths of a second)
LARGE_GROUP_SLOTS = 256  # EP group slots above which a layer tries fewer packing variants (solve time)
REFINE_ROUNDS = 6  # moves/swaps per packing refinement


def _replicas_to_fit(w: np.ndarray, share: float, budget: int, max_copies: int) -> int:
    """Fewest greedy replications (heaviest load per copy first) after which no copy exceeds `share`."""
    c = np.ones(len(w))
    for r in range(budget + 1):
        per = w / c
        e = int(np.argmax(per))
        if per[e] <= share * (1 + 1e-9) or r == budget:
            return r
        if c[e] >= max_copies:
            return r
        c[e] += 1
    return budget


def _flat(w, X, dense, rate, K, R):
    E, ep = len(w), len(rate)
    counts = replicate_counts(w, R, ep)
    ids, loads = pieces_of(range(E), w, counts)
    return pack(ids, loads * X, ep, K, rate, np.full(ep, dense))


def _hier(w, X, dense, rate, K, groups, in_node_R):
    """Experts onto nodes (node speed = sum of its members'), then replicas and packing inside nodes."""
    E = len(w)
    ids, loads = pieces_of(range(E), w, np.ones(E, dtype=np.int64))
    n_rate = np.array([rate[g].sum() for g in groups])
    n_base = np.array([dense * len(g) for g in groups])
    per_node = pack(ids, loads * X, len(groups), [len(g) * K for g in groups], n_rate, n_base)
    bins: list[list[int]] = [[] for _ in range(len(rate))]
    for g, experts in zip(groups, per_node):
        if not experts:
            return None
        wn = w[experts]
        budget = len(g) * K - len(experts)
        R = budget if in_node_R == "all" else _replicas_to_fit(wn, wn.sum() / len(g), budget, len(g))
        counts = np.ones(E, dtype=np.int64)
        counts[experts] = replicate_counts(wn, R, len(g))
        pids, ploads = pieces_of(experts, w, counts)
        for local, b in enumerate(pack(pids, ploads * X, len(g), K, rate[g], np.full(len(g), dense))):
            bins[g[local]] = b
    # the refinement runs over the whole group (cheaper than per node); it only moves a copy
    # across nodes when that strictly shortens the slowest member
    return bins


def _candidates(ev: Evaluator, li: int, rate: np.ndarray, groups: list, K: int) -> list[list[list[int]]]:
    """Unrefined packings (EP rank -> experts) of MoE layer row `li`, in order of preference on
    ties: fewer replicas, then in-node replicas."""
    l, w = ev.moe[li], ev.loads[li]
    E, ep = len(w), len(rate)
    X = float(ev.cm.expert_work[l].sum())
    dense = float(ev.cm.dense_work[l].sum()) * ev.T_e
    Rmax = max(0, ep * K - E)
    Rfit = _replicas_to_fit(w, w.sum() / ep, Rmax, ep)
    cands = []
    large = ep * K > LARGE_GROUP_SLOTS  # solve-time budget: fewer variants on large groups
    multi = len(groups) > 1
    if multi:
        cands.append(_hier(w, X, dense, rate, K, groups, "fit"))
    if not large:
        cands.append(_flat(w, X, dense, rate, K, Rfit))
        if multi:
            cands.append(_hier(w, X, dense, rate, K, groups, "all"))
    if Rmax != Rfit or large:
        cands.append(_flat(w, X, dense, rate, K, Rmax))
    return [c for c in cands if c is not None and all(c)]


def layer_placements(ev: Evaluator, rows: list[int], rate: np.ndarray, nodes: tuple, group: np.ndarray, K: int) -> dict[int, list[list[int]]]:
    """Expert -> EP ranks for each MoE layer row in `rows` on an EP group of member FLOP/s `rate`:
    every layer's candidate packings are refined together (`refine_batch`), then each layer keeps
    the candidate with the least compute + all-to-all time (ties: the earlier candidate)."""
    groups = node_groups(nodes)
    ep = len(rate)
    owner, problems = [], []
    for li in rows:
        for c in _candidates(ev, li, rate, groups, K):
            owner.append(li)
            problems.append(c)
    if not problems:
        return {}
    owner_a = np.array(owner)
    l_ids = np.array(ev.moe)[owner_a]
    X = ev.cm.expert_work[l_ids].sum(1)
    dense = ev.cm.dense_work[l_ids].sum(1) * ev.T_e
    w = ev.loads[owner_a]  # [C, E]
    C, E = w.shape
    pb, pe, valid = pieces_array(problems)
    base = np.repeat(dense[:, None], ep, 1)
    pb = refine_batch(pb, pe, valid, w * X[:, None], K, np.broadcast_to(rate, (C, ep)), base, REFINE_ROUNDS)
    # tokens each member receives: replicas split their expert's load evenly
    crow = np.broadcast_to(np.arange(C)[:, None], pb.shape)[valid]
    copies = np.bincount(crow * E + pe[valid], minlength=C * E).reshape(C, E).clip(min=1)
    routed = np.bincount(crow * ep + pb[valid], weights=(w / copies)[crow, pe[valid]], minlength=C * ep).reshape(C, ep)
    comp = ((dense[:, None] + X[:, None] * routed) / rate[None, :]).max(1)
    if ep > 1:
        comp = comp + 4 * np.atleast_1d(ev.topo.dispatch_time(routed * ev.bpt, group))  # F and B: dispatch + combine
    out = {}
    for li in rows:
        mine = np.flatnonzero(owner_a == li)
        if not len(mine):
            continue
        c = int(mine[np.flatnonzero(comp[mine] <= comp[mine].min() * (1 + 1e-6))[0]])
        e, r = pe[c][valid[c]], pb[c][valid[c]]
        o = np.lexsort((r, e))
        out[li] = [x.tolist() for x in np.split(r[o], np.cumsum(np.bincount(e, minlength=E))[:-1])]
    return out


def _profiles(ev: Evaluator) -> tuple[list[int], dict]:
    """Kind of each pipeline rank: EP members' FLOP/s (slowest dp replica) and node layout."""
    kinds, keys = [], {}
    for p in range(ev.inputs.pp):
        rate = ev.rates[p].min(0)
        nodes = baselines.member_nodes(ev, p)
        relabel = {n: i for i, n in enumerate(dict.fromkeys(nodes))}
        key = (tuple(np.round(rate / rate.max(), 9)), tuple(relabel[n] for n in nodes))
        if key not in keys:
            keys[key] = len(keys)
        kinds.append(keys[key])
    return kinds, keys


def _with_layers(stage_layers, s2r, kinds, maps_by_kind, moe) -> dict:
    if len(maps_by_kind) == 1:  # one kind of rank: the same map object for every partition (evaluation memo)
        return maps_by_kind[0]
    out = {}
    for s, (a, b) in enumerate(stage_layers):
        for l in range(a, b):
            if l in maps_by_kind[kinds[s2r[s]]]:
                out[l] = maps_by_kind[kinds[s2r[s]]][l]
    return out


def topo(ev: Evaluator, replica_slots: int, current: Optional[Plan] = None) -> tuple[Plan, dict]:
    i = ev.inputs
    K = baselines.slots_per_rank(i, replica_slots)
    kinds, keys = _profiles(ev)
    maps_by_kind: list[dict] = []
    routed_by_kind = []
    for k in range(len(keys)):
        p = kinds.index(k)
        rate, nodes = ev.rates[p].min(0), baselines.member_nodes(ev, p)
        first: dict = {}  # layers with the same load and work share one solve
        of_row = [first.setdefault(ev.loads[li].tobytes() + ev.cm.expert_work[l].tobytes() + ev.cm.dense_work[l].tobytes(), li)
                  for li, l in enumerate(ev.moe)]
        solved = layer_placements(ev, sorted(set(of_row)), rate, nodes, ev.grid[p, 0], K)
        maps = {l: [list(r) for r in solved[of_row[li]]] for li, l in enumerate(ev.moe)}
        maps_by_kind.append(maps)
        base = baselines.static(i)
        routed_by_kind.append(ev.routed(Plan(base.stage_layers, base.stage_to_pp_rank, maps, i.pp, i.ep, i.dp)))
    # per-(block, pipeline rank) times with each rank kind's own expert placement
    L = ev.spec.n_layers
    cost = np.zeros((L, i.pp))
    extra = None
    held = np.zeros((L, i.ep))
    for k, (maps, routed) in enumerate(zip(maps_by_kind, routed_by_kind)):
        c, extra = baselines.layer_cost(ev, routed)
        cols = [p for p in range(i.pp) if kinds[p] == k]
        cost[:, cols] = c[:, cols]
        for l, m in maps.items():
            held[l] = np.maximum(held[l], np.bincount([r for rs in m for r in rs], minlength=i.ep))
    routed_max = np.max(routed_by_kind, axis=0) if routed_by_kind else np.zeros((0, i.ep))
    stage_layers = baselines.partition(ev, cost, extra, held, routed_max)
    s2r = ev.s2r
    base = ev.static_plan()

    def make(layers, tag):
        return Plan(list(layers), list(s2r), _with_layers(layers, s2r, kinds, maps_by_kind, ev.moe), i.pp, i.ep, i.dp,
                    {"placer": "topo", "style": i.style, "replica_slots": int(replica_slots), "variant": tag})

    cands = []
    if current is not None and list(current.stage_to_pp_rank) == s2r and current.n_layers == L:
        cands.append(("current", current))
    bbt = baselines.balance_by_time(ev, base)
    cands += [("joint", make(stage_layers, "joint")), ("static_layers", make(base.stage_layers, "static_layers")),
              ("static", base), ("balance_by_time", bbt), ("eplb", baselines.eplb(ev, replica_slots))]
    seen, scored = set(), []
    for tag, plan in cands:
        key = (tuple(plan.stage_layers), id(plan.expert_map))
        if key in seen:  # same layout as an earlier candidate (e.g. the DP chose the even split)
            continue
        seen.add(key)
        res = ev.evaluate(plan)
        fits = bool((res.memory_bytes <= ev.mem).all())
        scored.append((not fits, res.iteration_time_s, tag, plan, res))
    order = sorted(range(len(scored)), key=lambda j: (scored[j][0], scored[j][1], j))
    _, best_t, best_tag, best, best_res = scored[order[0]]
    info = {"candidates": {t: s for _, s, t, _, _ in scored}, "chosen": best_tag}
    if not scored[order[0]][0] and best_tag in ("joint", "static_layers"):
        best, best_t, best_res, n = _boundary_search(ev, best, best_t, best_res, make, best_tag)
        info["boundary_evals"] = n
    info["evaluation"] = best_res
    meta = dict(best.meta) | {"placer": "topo", "replica_slots": int(replica_slots), "variant": best_tag, "predicted_s": best_t}
    return Plan(best.stage_layers, best.stage_to_pp_rank, best.expert_map, best.pp, best.ep, best.dp, meta), info


def _boundary_search(ev: Evaluator, plan: Plan, t: float, res0, make, tag):
    """Move one stage boundary by one block while the simulated time drops (first improvement,
    boundaries in order), within a deterministic evaluation budget."""
    n_actions = sum(len(a) for a in ev.order.values()) * ev.inputs.dp
    budget = min(4 * (ev.n_stages - 1), EVAL_ACTION_BUDGET // max(1, n_actions))
    layers = list(plan.stage_layers)
    n = 0
    improved = True
    while improved and n < budget:
        improved = False
        for s in range(len(layers) - 1):
            for d in (-1, 1):
                if n >= budget:
                    break
                (a, b), (_, e) = layers[s], layers[s + 1]
                if not (a < b + d < e):
                    continue
                trial = layers[:s] + [(a, b + d), (b + d, e)] + layers[s + 2:]
                p = make(trial, tag)
                res = ev.evaluate(p)
                n += 1
                if res.iteration_time_s < t * (1 - 1e-9) and (res.memory_bytes <= ev.mem).all():
                    layers, plan, t, res0, improved = trial, p, res.iteration_time_s, res, True
                    break
    return plan, t, res0, n
