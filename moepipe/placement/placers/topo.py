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
   With token origins (inputs.origins) or parallel.a2a=hierarchical, origin-local packings join
   (`pack_by_origin`: homes on the rank, else the node, where an expert's tokens start, within a
   balance slack; copies planned per (expert, node) for balance, then copies in the nodes of most
   remote demand; single-copy experts then balanced inside their node on exact loads), and every
   candidate is scored with the runtime's nearest-replica exchange on those origins
   (`layer_exchange`, `exchange_time`: the evaluator's model), ties broken by fewer inter-node
   bytes. Without origins the even-split estimate above is used (unchanged plans and solve time).
2. Layers: exact min-max partition of per-(block, pipeline rank) times that include each MoE
   block's critical path (slowest EP member + dispatch/combine), within each rank's memory.
3. Candidates (this plan, the same experts on the static split, static, balance_by_time, eplb
   at the same replica budget, and the current plan) are evaluated with the exact simulator
   costs; the best is improved by moving stage boundaries one block at a time, with a fixed
   number of evaluations that shrinks as the schedule grows. Deterministic throughout.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np

from moepipe.placement.cost_model import exchange_time
from moepipe.placement.plan import Plan
from moepipe.placement.placers import baselines, robust
from moepipe.placement.placers.evaluate import Evaluator
from moepipe.placement.placers.packing import (
    every_bin_used, expert_maps, node_groups, node_members, pack_batch, pack_by_origin, pack_in_nodes, pieces_batch, refine_batch,
    replicate_counts_batch,
)

EVAL_ACTION_BUDGET = 6000  # engine actions the boundary search may simulate (a few tenths of a second)
LARGE_GROUP_SLOTS = 256  # EP group slots above which a layer tries fewer packing variants (solve time)
REFINE_ROUNDS = 6  # moves/swaps per packing refinement
# how far past the balanced finish an origin-local home may go; large slacks trade balance for
# locality, which pays when the all-to-all is a large share (ties go to fewer inter-node bytes)
ORIGIN_SLACKS = (1.1, 1.02, 1.3, 2.0, 5.0)
LARGE_ORIGIN_SLACKS = (1.1,)  # on large groups (solve time)
# candidate preference on equal time: fewer replicas, then in-node replicas
HIER_FIT, FLAT_FIT, HIER_ALL, FLAT_ALL = range(4)


def _replicate_to_fit(w: np.ndarray, valid: np.ndarray, share: np.ndarray, budget: np.ndarray, max_copies) -> np.ndarray:
    """Copies per expert [C, E] after the fewest greedy replications (heaviest load per copy
    first, ties: lowest column) after which no copy exceeds `share` [C]; a problem stops early at
    its `budget` or when its heaviest copy's expert already has `max_copies`."""
    C = len(w)
    rows = np.arange(C)
    c = valid.astype(np.int64)
    done = np.zeros(C, dtype=np.int64)
    live = np.ones(C, dtype=bool)
    limit = share * (1 + 1e-9)
    while True:
        per = np.where(valid, w / np.maximum(c, 1), -np.inf)
        e = per.argmax(1)
        live &= (per[rows, e] > limit) & (done < budget) & (c[rows, e] < max_copies)
        if not live.any():
            return c
        r = rows[live]
        c[r, e[r]] += 1
        done[r] += 1


def _flat(w, X, dense, rate, K, counts):
    """Every layer's copies packed onto the whole EP group: (EP rank, expert) of each piece."""
    C, ep = len(w), len(rate)
    col, load, ok = pieces_batch(w, counts)
    rank = pack_batch(col, load * X[:, None], ok, np.full((C, ep), K), np.broadcast_to(rate, (C, ep)), np.repeat(dense[:, None], ep, 1))
    return rank, col


def _hier(w, X, dense, rate, K, groups, variants):
    """Experts onto nodes (node speed = sum of its members'), then replicas and packing inside
    nodes, for every layer and in-node replica variant ("fit", "all") at once. Returns
    (variant, EP rank, expert) blocks over the layers, and which layers have experts on every node.
    The refinement later runs over the whole group (cheaper than per node); it only moves a copy
    across nodes when that strictly shortens the slowest member."""
    C, E = w.shape
    G = len(groups)
    size = np.array([len(g) for g in groups])
    col, load, ok = pieces_batch(w, np.ones((C, E), dtype=np.int64))
    n_rate = np.array([rate[g].sum() for g in groups])
    node = pack_batch(col, load * X[:, None], ok, np.broadcast_to(size * K, (C, G)), np.broadcast_to(n_rate, (C, G)), dense[:, None] * size)
    members, held = node_members(node, col, G)
    complete = held.any(2).all(1)
    M = held.shape[2]
    wl = np.take_along_axis(w, members.reshape(C, -1), 1).reshape(C * G, M) * held.reshape(C * G, M)
    valid = held.reshape(C * G, M)
    spare = (size * K - held.sum(2)).ravel()
    copies = np.tile(size, C)
    counts = []
    for v in variants:
        if v == "all":
            counts.append(replicate_counts_batch(wl, spare, copies, valid))
        else:
            counts.append(_replicate_to_fit(wl, valid, wl.sum(1) / copies, spare, copies))
    V = len(variants)
    rank, expert = pack_in_nodes(np.tile(members, (V, 1, 1)), np.concatenate(counts).reshape(V * C, G, M), np.tile(w, (V, 1)),
                                 np.tile(X, V), groups, K, rate, np.tile(dense, V))
    return [(v, rank[i * C:(i + 1) * C], expert[i * C:(i + 1) * C]) for i, v in enumerate(variants)], complete


def _candidates(w: np.ndarray, X: np.ndarray, dense: np.ndarray, rate: np.ndarray, groups: list, K: int):
    """Unrefined packings of all layers (w [C, E]; X, dense [C]) as (layer [N], EP rank [N, P],
    expert [N, P]; rank -1: no piece), sorted by layer and then preference on ties: fewer
    replicas, then in-node replicas. Packings that leave an EP rank empty are left out."""
    C, E = w.shape
    ep = len(rate)
    rows = np.arange(C)
    Rmax = max(0, ep * K - E)
    large = ep * K > LARGE_GROUP_SLOTS  # solve-time budget: fewer variants on large groups
    fit = _replicate_to_fit(w, np.ones((C, E), dtype=bool), w.sum(1) / ep, np.full(C, Rmax), ep)
    blocks = []  # (layers, preference, rank, expert)
    if len(groups) > 1:
        hier, complete = _hier(w, X, dense, rate, K, groups, ("fit",) if large else ("fit", "all"))
        for v, rank, expert in hier:
            blocks.append((rows[complete], HIER_FIT if v == "fit" else HIER_ALL, rank[complete], expert[complete]))
    if not large:
        blocks.append((rows, FLAT_FIT, *_flat(w, X, dense, rate, K, fit)))
    more = rows if large else rows[fit.sum(1) - E != Rmax]
    if len(more):
        blocks.append((more, FLAT_ALL, *_flat(w[more], X[more], dense[more], rate, K, replicate_counts_batch(w[more], Rmax, ep))))
    P = max(b[2].shape[1] for b in blocks)
    pad = lambda a, v: np.pad(a, ((0, 0), (0, P - a.shape[1])), constant_values=v)  # noqa: E731
    layer = np.concatenate([b[0] for b in blocks])
    pref = np.concatenate([np.full(len(b[0]), b[1]) for b in blocks])
    rank = np.concatenate([pad(b[2], -1) for b in blocks])
    expert = np.concatenate([pad(b[3], 0) for b in blocks])
    keep = every_bin_used(rank, ep)
    o = np.lexsort((pref, layer))
    o = o[keep[o]]
    return layer[o], rank[o], expert[o]


def layer_placements(ev: Evaluator, rows: list[int], rate: np.ndarray, nodes: tuple, group: np.ndarray, K: int) -> dict[int, list[list[int]]]:
    """Expert -> EP ranks for each MoE layer row in `rows` on an EP group of member FLOP/s `rate`:
    every layer's candidate packings are built and refined together (`pack_batch`,
    `refine_batch`), then each layer keeps the candidate with the least compute + all-to-all
    time (ties: the earlier candidate)."""
    if not rows:
        return {}
    ep = len(rate)
    rows_a = np.asarray(rows, dtype=np.int64)
    l_ids = np.array(ev.moe)[rows_a]
    X_l = ev.cm.expert_work[l_ids].sum(1)
    dense_l = ev.cm.dense_work[l_ids].sum(1) * ev.T_e
    owner, pb, pe = _candidates(ev.loads[rows_a], X_l, dense_l, rate, node_groups(nodes), K)
    if not len(owner):
        return {}
    X, dense = X_l[owner], dense_l[owner]
    w = ev.loads[rows_a[owner]]  # [C, E]
    C, E = w.shape
    valid = pb >= 0
    pb = refine_batch(pb.clip(min=0), pe, valid, w * X[:, None], K, np.broadcast_to(rate, (C, ep)), np.repeat(dense[:, None], ep, 1), REFINE_ROUNDS)
    if ev.origin_share is not None or ev.cm.a2a != "flat":
        return _exact_choice(ev, rows_a, owner, expert_maps(np.where(valid, pb, -1), pe, E), rate, nodes, group, K, X_l, dense_l)
    # tokens each member receives: replicas split their expert's load evenly
    crow = np.broadcast_to(np.arange(C)[:, None], pb.shape)[valid]
    copies = np.bincount(crow * E + pe[valid], minlength=C * E).reshape(C, E).clip(min=1)
    routed = np.bincount(crow * ep + pb[valid], weights=(w / copies)[crow, pe[valid]], minlength=C * ep).reshape(C, ep)
    comp = ((dense[:, None] + X[:, None] * routed) / rate[None, :]).max(1)
    if ep > 1:
        comp = comp + 4 * np.atleast_1d(ev.topo.dispatch_time(routed * ev.bpt, group))  # F and B: dispatch + combine
    # per layer the first candidate (in preference order) within 1e-6 of its fastest
    fastest = np.full(len(rows_a), np.inf)
    np.minimum.at(fastest, owner, comp)
    near = np.flatnonzero(comp <= fastest[owner] * (1 + 1e-6))
    layers, first = np.unique(owner[near], return_index=True)
    chosen = near[first]
    maps = expert_maps(np.where(valid[chosen], pb[chosen], -1), pe[chosen], E)
    return {int(rows_a[i]): m for i, m in zip(layers, maps)}


def origin_candidates(ev: Evaluator, rows_a: np.ndarray, rate: np.ndarray, nodes: tuple, group: np.ndarray, K: int,
                      X_l: np.ndarray, dense_l: np.ndarray) -> tuple[np.ndarray, list]:
    """Origin-local packings of the layers `rows_a` (`pack_by_origin`): homes on the rank (else
    the node) where most of an expert's tokens start, within a few balance slacks, without
    replicas, with every spare slot given to copies in the nodes of most remote demand, and
    with copies for balance first (hot experts split inside the nodes that use them).
    Returns (layer index into rows_a [N], expert maps [N])."""
    E, ep = ev.spec.num_experts, len(rate)
    C = len(rows_a)
    w = ev.loads[rows_a]
    origins = ev.origin_share[rows_a] * w[:, None, :] if ev.origin_share is not None else np.broadcast_to(w[:, None, :] / ep, (C, ep, E))
    g = np.asarray(group, dtype=np.int64)
    cost = 1.0 / ev.topo.bandwidth[np.ix_(g, g)]
    np.fill_diagonal(cost, 0.0)
    spare = max(0, ep * K - E)
    large = ep * K > LARGE_GROUP_SLOTS  # solve-time budget: fewer variants on large groups
    slacks = LARGE_ORIGIN_SLACKS if large else ORIGIN_SLACKS
    owner, maps = [], []
    variants = [(0, False)] + (([(spare, True)] if large else [(spare, False), (spare, True)]) if spare else [])
    for slack in slacks:
        for reps, balance_first in variants:
            rank, expert = pack_by_origin(w, origins, cost, nodes, K, rate, dense_l, X_l, slack, reps, balance_first)
            owner.append(np.arange(C))
            maps += expert_maps(rank, expert, E)
    return np.concatenate(owner), maps


def _exact_choice(ev: Evaluator, rows_a, owner, maps, rate, nodes, group, K, X_l, dense_l) -> dict[int, list[list[int]]]:
    """Each layer's candidate (the packings in `maps`, one per entry of `owner`, plus the
    origin-local packings) with the least compute + all-to-all time under the runtime's
    nearest-replica rule, the inputs' token origins and all-to-all mode (the evaluator's
    exchange); ties within 1e-6: fewer inter-node bytes, then the earlier candidate."""
    o2, m2 = origin_candidates(ev, rows_a, rate, nodes, group, K, X_l, dense_l)
    owner = np.concatenate([owner, o2])
    maps = list(maps) + m2
    g = np.asarray(group, dtype=np.int64)
    cross = ev.topo.node_of[g][:, None] != ev.topo.node_of[g][None, :]
    t = np.zeros(len(owner))
    inter = np.zeros(len(owner))
    seen: dict = {}
    n_given = len(owner) - len(o2)
    node = ev.topo.node_of[g]
    for i, (c, m) in enumerate(zip(owner, maps)):
        key = (int(c), tuple(map(tuple, m)))
        if key in seen:  # the same packing from another variant: score it once
            t[i], inter[i] = t[seen[key]], inter[seen[key]]
            maps[i] = maps[seen[key]]
            continue
        seen[key] = i
        li = int(rows_a[c])
        routed, tok = ev.layer_exchange(li, m)  # memoised: the evaluator reads the chosen ones again
        if i >= n_given:  # origin-local packings balance on estimates: even out their exact loads inside nodes
            m2 = _rebalance_in_node(m, routed, ev.loads[li], K, node, rate, dense_l[c], X_l[c])
            if m2 is not m:
                maps[i] = m = m2
                routed, tok = ev.layer_exchange(li, m)
        comp = ((dense_l[c] + X_l[c] * routed) / rate).max()
        a2a = exchange_time(None if tok is None else tok * ev.bpt, routed * ev.bpt, g, ev.topo, ev.cm.a2a) if len(g) > 1 else 0.0
        t[i] = comp + 2 * a2a  # F and B: dispatch + combine each
        inter[i] = float((tok * cross).sum()) if tok is not None else float((routed[None, :] / len(g) * cross).sum())
    fastest = np.full(len(rows_a), np.inf)
    np.minimum.at(fastest, owner, t)
    out = {}
    for c in range(len(rows_a)):
        idx = np.flatnonzero((owner == c) & (t <= fastest[c] * (1 + 1e-6)))
        if len(idx):
            out[int(rows_a[c])] = maps[idx[np.argmin(inter[idx])]]  # argmin: the first on ties
    return out


def _rebalance_in_node(m: list, routed: np.ndarray, w: np.ndarray, K: int, node: np.ndarray, rate: np.ndarray, dense: float, X: float,
                       rounds: Optional[int] = None) -> list:
    """Moves and swaps of single-copy experts between ranks of one node that lower the slowest
    rank's finish time, from the exact routed tokens `routed` [ep] (a single copy takes all its
    expert's tokens wherever it sits, so the loads stay exact; the experts stay in their node, so
    cross-node bytes do not change). Returns `m` itself when nothing moved, else a new map."""
    ep, E = len(routed), len(m)
    lens = np.fromiter(map(len, m), dtype=np.int64, count=E)
    where = np.array([h[0] for h in m], dtype=np.int64)
    single = lens == 1
    count = np.bincount(np.concatenate([np.asarray(h) for h in m]), minlength=ep)
    load = np.asarray(routed, dtype=np.float64).copy()
    moved = False
    for _ in range(2 * ep if rounds is None else rounds):
        fin = (dense + X * load) / rate
        h = int(fin.argmax())
        mine = np.flatnonzero(single & (where == h))
        peers = np.flatnonzero((node == node[h]) & (np.arange(ep) != h))
        if not len(mine) or not len(peers):
            break
        x = w[mine]  # [a]
        # moves of e to b: [a, b]
        mv = np.maximum((dense + X * (load[h] - x[:, None])) / rate[h], (dense + X * (load[peers][None, :] + x[:, None])) / rate[peers][None, :])
        mv = np.where((count[peers] < K)[None, :], mv, np.inf)
        # swaps of e (on h) with f (single, on b in the node), f lighter: [a, f]
        theirs = np.flatnonzero(single & np.isin(where, peers))
        y = w[theirs]
        d = x[:, None] - y[None, :]
        b_of = where[theirs]
        sw = np.maximum((dense + X * (load[h] - d)) / rate[h], (dense + X * (load[b_of][None, :] + d)) / rate[b_of][None, :])
        sw = np.where(d > 0, sw, np.inf)
        best_mv = mv.min() if mv.size else np.inf
        best_sw = sw.min() if sw.size else np.inf
        if min(best_mv, best_sw) >= fin[h] * (1 - 1e-9):
            break
        if best_mv <= best_sw:
            i, j = np.unravel_index(mv.argmin(), mv.shape)
            e, b = int(mine[i]), int(peers[j])
            load[h] -= w[e]
            load[b] += w[e]
            count[h] -= 1
            count[b] += 1
            where[e] = b
        else:
            i, j = np.unravel_index(sw.argmin(), sw.shape)
            e, f = int(mine[i]), int(theirs[j])
            b = int(where[f])
            load[h] += w[f] - w[e]
            load[b] += w[e] - w[f]
            where[e], where[f] = b, h
        moved = True
    if not moved:
        return m
    return [[int(where[e])] if single[e] else h for e, h in enumerate(m)]


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
    """topo's plan for the evaluator's job: on the mean load, or over the load scenarios
    (placer.objective=expected|quantile with inputs.scenarios: `_robust_topo`)."""
    if robust.is_robust(ev.inputs):
        return _robust_topo(ev, replica_slots, current)
    return _topo_mean(ev, replica_slots, current)


def _topo_mean(ev: Evaluator, replica_slots: int, current: Optional[Plan] = None) -> tuple[Plan, dict]:
    i = ev.inputs
    K = baselines.slots_per_rank(i, replica_slots)
    kinds, keys = _profiles(ev)
    maps_by_kind: list[dict] = []
    routed_by_kind = []
    for k in range(len(keys)):
        p = kinds.index(k)
        rate, nodes = ev.rates[p].min(0), baselines.member_nodes(ev, p)
        first: dict = {}  # layers with the same load, token origins and work share one solve
        origin_key = (lambda li: b"") if ev.origin_share is None else (lambda li: ev.origin_share[li].tobytes())
        of_row = [first.setdefault(ev.loads[li].tobytes() + origin_key(li) + ev.cm.expert_work[l].tobytes() + ev.cm.dense_work[l].tobytes(), li)
                  for li, l in enumerate(ev.moe)]
        solved = layer_placements(ev, sorted(set(of_row)), rate, nodes, ev.grid[p, 0], K)
        maps, taken = {}, set()
        for li, l in enumerate(ev.moe):  # the first layer of a solve takes its lists, later ones a copy
            maps[l] = [list(r) for r in solved[of_row[li]]] if of_row[li] in taken else solved[of_row[li]]
            taken.add(of_row[li])
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


def _robust_topo(ev: Evaluator, replica_slots: int, current: Optional[Plan]) -> tuple[Plan, dict]:
    """topo for placer.objective=expected|quantile (placers/robust.py): the candidates of the
    mean-load solve (topo's own choice, eplb, static, the current plan) and hedge candidates
    (topo and eplb packed on `robust.hedge_load`, which copies every expert hot in some scenario),
    each scored by the objective over the scenarios; the best that fits in memory. Ties: the
    earlier candidate (the mean-load plan first)."""
    i = ev.inputs
    score = robust.scorer(i, ev)
    plan, _ = _topo_mean(ev, replica_slots, current)  # ev's own load is the mean
    cands = [("mean", plan)]
    if current is not None and list(current.stage_to_pp_rank) == ev.s2r and current.n_layers == ev.spec.n_layers:
        cands.append(("current", current))
    cands += [("eplb", baselines.eplb(ev, replica_slots)), ("static", ev.static_plan())]
    hedge = robust.hedge_load(i)
    if hedge is not None and replica_slots > 0:
        h_ev = Evaluator(replace(i, expert_load=hedge, scenarios=None, scenario_weights=None, objective="mean"))
        h_plan, _ = _topo_mean(h_ev, replica_slots, None)
        cands += [("hedge", h_plan), ("hedge_eplb", baselines.eplb(h_ev, replica_slots))]
    scored = []
    for j, (tag, p) in enumerate(cands):
        fits = bool((ev.evaluate(p).memory_bytes <= ev.mem).all())
        scored.append((not fits, score(p), j, tag, p))
    scored.sort(key=lambda x: x[:3])
    _, best_s, _, tag, best = scored[0]
    meta = dict(best.meta) | {"placer": "topo", "replica_slots": int(replica_slots), "variant": f"robust:{tag}",
                              "objective": i.objective, "objective_s": best_s}
    out = {"candidates": {t: s for _, s, _, t, _ in scored}, "chosen": tag, "evaluation": ev.evaluate(best), "objective_s": best_s}
    return Plan(best.stage_layers, best.stage_to_pp_rank, best.expert_map, best.pp, best.ep, best.dp, meta), out
