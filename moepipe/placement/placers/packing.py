"""Expert replication and balanced packing for one MoE layer (numpy + heapq, no plan types).

A layer's experts become "pieces": an expert with c copies is c pieces of load w/c (the
runtime splits a replicated expert's tokens evenly over its holders). Pieces are packed onto
EP ranks ("bins") that have a fixed number of slots; no bin holds two copies of one expert.

Bin cost is speed-aware: finish_b = (base_b + load_b) / rate_b, where base is the bin's fixed
work (the dense part of the block, in the same units as load) and rate its relative speed.
With base = 0 and rate = 1 this is plain load balancing (EPLB).
"""
from __future__ import annotations

import heapq
from typing import Optional, Sequence

import numpy as np


def replicate_counts(w: np.ndarray, n_extra: int, max_copies: int) -> np.ndarray:
    """Copies per expert: start at one, then `n_extra` times give one more copy to the expert
    with the largest load per copy (ties: lowest id), never above `max_copies`."""
    w = np.asarray(w, dtype=np.float64)
    c = np.ones(len(w), dtype=np.int64)
    heap = [(-float(x), e) for e, x in enumerate(w)]
    heapq.heapify(heap)
    for _ in range(max(0, n_extra)):
        while heap and c[heap[0][1]] >= max_copies:
            heapq.heappop(heap)
        if not heap:
            break
        _, e = heapq.heappop(heap)
        c[e] += 1
        heapq.heappush(heap, (-float(w[e]) / c[e], e))
    return c


def pieces_of(experts: Sequence[int], w: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expert id, load) of every piece, heaviest first (ties: lower expert id)."""
    ids = np.repeat(np.asarray(experts, dtype=np.int64), counts[np.asarray(experts, dtype=np.int64)])
    loads = np.asarray(w, dtype=np.float64)[ids] / counts[ids]
    order = np.lexsort((ids, -loads))
    return ids[order], loads[order]


def pack(
    ids: np.ndarray,
    loads: np.ndarray,
    n_bins: int,
    slots: int | Sequence[int],
    rate: Optional[np.ndarray] = None,
    base: Optional[np.ndarray] = None,
) -> list[list[int]]:
    """Greedy largest-first: each piece (given heaviest first) goes to the bin whose finish time
    after taking it is smallest, among bins with a free slot not holding that expert (ties: fewer
    pieces, then lower index). A piece no bin can take is dropped (its expert keeps fewer copies).
    Bins left empty take a piece from the bin with the most pieces (every EP rank needs one)."""
    rate = np.ones(n_bins) if rate is None else np.asarray(rate, dtype=np.float64)
    base = np.zeros(n_bins) if base is None else np.asarray(base, dtype=np.float64)
    cap = np.full(n_bins, slots, dtype=np.int64) if np.isscalar(slots) else np.asarray(slots, dtype=np.int64)
    load = base.astype(np.float64).copy()
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    held: list[set] = [set() for _ in range(n_bins)]
    uniform_rate = bool(np.all(rate == rate[0]))
    if uniform_rate:
        # min finish after adding x == min current load: a heap keyed on (load, count, index)
        heap = [(float(load[b]), 0, b) for b in range(n_bins) if cap[b] > 0]
        heapq.heapify(heap)
        for e, x in zip(ids.tolist(), loads.tolist()):
            skipped = []
            while heap and e in held[heap[0][2]]:
                skipped.append(heapq.heappop(heap))
            if heap:
                _, n, b = heapq.heappop(heap)
                bins[b].append(e)
                held[b].add(e)
                load[b] += x
                if n + 1 < cap[b]:
                    heapq.heappush(heap, (float(load[b]), n + 1, b))
            for item in skipped:
                heapq.heappush(heap, item)
    else:
        count = np.zeros(n_bins, dtype=np.int64)
        for e, x in zip(ids.tolist(), loads.tolist()):
            ok = (count < cap) & np.array([e not in h for h in held])
            if not ok.any():
                continue
            finish = np.where(ok, (load + x) / rate, np.inf)
            best = np.flatnonzero(finish <= finish.min() * (1 + 1e-12))
            b = int(best[np.lexsort((best, count[best]))[0]])
            bins[b].append(e)
            held[b].add(e)
            load[b] += x
            count[b] += 1
    for b in range(n_bins):  # an EP rank with no expert is not a valid plan: borrow one
        if not bins[b]:
            donor = max(range(n_bins), key=lambda k: (len(bins[k]), -k))
            if len(bins[donor]) > 1:
                bins[b].append(bins[donor].pop())
    return bins


def refine(
    bins: list[list[int]], w: np.ndarray, slots: int, rate: np.ndarray, base: np.ndarray, max_rounds: int = 8
) -> list[list[int]]:
    """Local search on the slowest bin: apply the best single move of one of its pieces to a bin
    with a free slot, or swap with a lighter piece of another bin, while that lowers the slowest
    finish time. `w` is the load of each expert (split over its copies). Vectorised over pairs."""
    w = np.asarray(w, dtype=np.float64)
    rate, base = np.asarray(rate, dtype=np.float64), np.asarray(base, dtype=np.float64)
    n, E = len(bins), len(w)
    if n < 2:
        return [list(b) for b in bins]
    held = np.zeros((n, E), dtype=bool)
    for b, xs in enumerate(bins):
        held[b, xs] = True
    pw = w / held.sum(0).clip(min=1)
    ar = np.arange(n)
    changed = False
    bound = (base.sum() + w.sum()) / rate.sum()  # no packing finishes before the perfectly even split
    for _ in range(max_rounds):
        size = held.sum(1)
        load = base + held @ pw
        fin = load / rate
        order = np.argsort(-fin, kind="stable")
        h = int(order[0])
        if fin[h] <= bound * (1 + 1e-4):
            break
        third = fin[order[2]] if n > 2 else 0.0
        rest = np.where(ar == order[1], third, fin[order[1]])  # slowest finish among bins other than h and b
        xs = np.flatnonzero(held[h])
        px = pw[xs]
        best, act = fin[h] * (1 - 1e-9), None
        if len(xs) > 1:
            can = (size < slots)[None, :] & ~held[:, xs].T & (ar != h)[None, :]
            m = np.maximum(np.maximum(((load[h] - px) / rate[h])[:, None], (load[None, :] + px[:, None]) / rate[None, :]), rest[None, :])
            m = np.where(can, m, np.inf)
            i, b = np.unravel_index(int(np.argmin(m)), m.shape)
            if m[i, b] < best:
                best, act = m[i, b], (int(xs[i]), int(b), -1)
        bj, yj = np.nonzero(held)
        keep = bj != h
        bj, yj = bj[keep], yj[keep]
        if len(yj):
            py = pw[yj]
            ok = ~held[h, yj][None, :] & ~held[bj[None, :], xs[:, None]] & (py[None, :] < px[:, None])
            m = np.maximum(np.maximum((load[h] - px[:, None] + py[None, :]) / rate[h], (load[bj][None, :] - py[None, :] + px[:, None]) / rate[bj][None, :]),
                           rest[bj][None, :])
            m = np.where(ok, m, np.inf)
            i, j = np.unravel_index(int(np.argmin(m)), m.shape)
            if m[i, j] < best:
                best, act = m[i, j], (int(xs[i]), int(bj[j]), int(yj[j]))
        if act is None:
            break
        x, b, y = act
        held[h, x], held[b, x] = False, True
        if y >= 0:
            held[b, y], held[h, y] = False, True
        changed = True
    if not changed:
        return [list(b) for b in bins]
    rows, cols = np.nonzero(held)  # row-major: grouped by bin, experts ascending
    return [c.tolist() for c in np.split(cols, np.cumsum(np.bincount(rows, minlength=n))[:-1])]


def to_expert_map(bins: list[list[int]], num_experts: int) -> list[list[int]]:
    """bins (EP rank -> experts) to expert -> ascending EP ranks."""
    out: list[list[int]] = [[] for _ in range(num_experts)]
    for r, b in enumerate(bins):
        for e in b:
            out[e].append(r)
    return [sorted(x) for x in out]


def node_groups(member_node: Sequence[int]) -> list[list[int]]:
    """EP ranks grouped by node, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for r, n in enumerate(member_node):
        groups.setdefault(int(n), []).append(r)
    return list(groups.values())


def eplb_layer(w: np.ndarray, ep: int, slots: int, member_node: Optional[Sequence[int]] = None) -> list[list[int]]:
    """DeepSeek EPLB for one layer: every EP rank has `slots` slots, all filled.

    Flat: replicate the heaviest experts (largest load per copy) into the ep*slots - E spare
    slots, then pack the copies largest-first onto the least-loaded rank with a free slot.
    Hierarchical (the EP group spans nodes): pack experts onto nodes first (each node takes its
    share of the experts, E * ranks_in_node / ep rounded up), then replicate and pack inside each
    node, so replicas stay in their expert's node. Returns expert -> EP ranks.
    """
    w = np.asarray(w, dtype=np.float64)
    E = len(w)
    groups = node_groups(member_node) if member_node is not None else [list(range(ep))]
    if len(groups) == 1:
        counts = replicate_counts(w, ep * slots - E, ep)
        ids, loads = pieces_of(range(E), w, counts)
        return to_expert_map(pack(ids, loads, ep, slots), E)
    node_cap = [-(-E * len(g) // ep) for g in groups]
    ids, loads = pieces_of(range(E), w, np.ones(E, dtype=np.int64))
    per_node = pack(ids, loads, len(groups), node_cap)
    bins: list[list[int]] = [[] for _ in range(ep)]
    for g, experts in zip(groups, per_node):
        counts = np.ones(E, dtype=np.int64)
        extra = replicate_counts(w[experts], len(g) * slots - len(experts), len(g))
        counts[experts] = extra
        pids, ploads = pieces_of(experts, w, counts)
        for local, b in enumerate(pack(pids, ploads, len(g), slots)):
            bins[g[local]] = b
    return to_expert_map(bins, E)
