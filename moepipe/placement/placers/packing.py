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
from itertools import chain
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
    finish time. `w` is the load of each expert (split over its copies). One problem of `refine_batch`."""
    pb, pe, valid = pieces_array([bins])
    out = refine_batch(pb, pe, valid, np.asarray(w, dtype=np.float64)[None], slots, np.asarray(rate, dtype=np.float64)[None],
                       np.asarray(base, dtype=np.float64)[None], max_rounds)
    return bins_of(out[0], pe[0], valid[0], len(bins))


def pieces_array(problems: Sequence[list[list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin [B, P], expert [B, P], valid [B, P]) of every piece of B packings (bins -> experts),
    padded to the longest; the form `refine_batch` works on."""
    P = max(sum(map(len, bins)) for bins in problems)
    pb = np.zeros((len(problems), P), dtype=np.int64)
    pe = np.zeros((len(problems), P), dtype=np.int64)
    valid = np.zeros((len(problems), P), dtype=bool)
    for i, bins in enumerate(problems):
        lens = [len(x) for x in bins]
        k = sum(lens)
        pb[i, :k] = np.repeat(np.arange(len(bins)), lens)
        pe[i, :k] = list(chain.from_iterable(bins))
        valid[i, :k] = True
    return pb, pe, valid


def bins_of(pb: np.ndarray, pe: np.ndarray, valid: np.ndarray, n_bins: int) -> list[list[int]]:
    """One problem's pieces back to bins -> ascending experts."""
    b, e = pb[valid], pe[valid]
    o = np.lexsort((e, b))
    b, e = b[o], e[o]
    return [x.tolist() for x in np.split(e, np.cumsum(np.bincount(b, minlength=n_bins))[:-1])]


def refine_batch(pb: np.ndarray, pe: np.ndarray, valid: np.ndarray, w: np.ndarray, slots: int, rate: np.ndarray, base: np.ndarray,
                 max_rounds: int = 8) -> np.ndarray:
    """`refine` for B independent packings at once (all on n bins), one numpy pass per round for
    the whole batch: a Python loop per problem made this the placer's hot spot at 64 layers.

    pb/pe/valid [B, P]: bin and expert of each piece (`pieces_array`); w [B, E]; rate/base [B, n].
    Per problem and round: h = slowest bin; candidates are moving a piece x of h to a bin b with a
    free slot that lacks x (h keeps >= 1 piece), or swapping x with a lighter piece y of bin b
    (neither bin holding the other's expert); the candidate with the smallest resulting slowest
    finish is applied if it beats h's finish. Ties: lowest x, then b (moves) or (b, y) (swaps);
    moves before swaps. Stops at `max_rounds`, when nothing improves, or within 1e-4 of the even
    split. Returns the new bins [B, P]."""
    B, P = pb.shape
    n, E = rate.shape[1], w.shape[1]
    pb = pb.copy()
    if n < 2 or B == 0:
        return pb
    rows = np.arange(B)
    held = np.zeros((B, n, E), dtype=bool)
    held[np.broadcast_to(rows[:, None], (B, P))[valid], pb[valid], pe[valid]] = True
    pw = w / held.sum(1).clip(min=1)
    ppw = np.where(valid, np.take_along_axis(pw, pe, 1), 0.0)  # each piece's load (copies count never changes)
    bound = (base.sum(1) + w.sum(1)) / rate.sum(1)  # no packing finishes before the perfectly even split
    active = np.ones(B, dtype=bool)
    ar = np.arange(n)
    K = int(slots)
    Kx = max(K, int(np.bincount((rows[:, None] * n + pb)[valid], minlength=B * n).max()))  # pieces a bin can hold now
    for _ in range(max_rounds):
        flat = (rows[:, None] * n + pb)[valid]
        size = np.bincount(flat, minlength=B * n).reshape(B, n)
        load = base + np.bincount(flat, weights=ppw[valid], minlength=B * n).reshape(B, n)
        fin = load / rate
        order = np.argsort(-fin, axis=1, kind="stable")
        h = order[:, 0]
        fh = fin[rows, h]
        active &= fh > bound * (1 + 1e-4)
        if not active.any():
            break
        third = fin[rows, order[:, 2]] if n > 2 else np.zeros(B)
        rest = np.where(ar[None, :] == order[:, 1:2], third[:, None], fin[rows, order[:, 1]][:, None])  # slowest other than h and b
        inh = valid & (pb == h[:, None])
        sel = np.argsort(np.where(inh, pe, E), axis=1, kind="stable")[:, :Kx]  # pieces of h, by expert
        xv = np.take_along_axis(inh, sel, 1)
        xs = np.take_along_axis(pe, sel, 1)
        px = np.take_along_axis(ppw, sel, 1)
        lh, rh = load[rows, h], rate[rows, h]
        # moves: [B, K, n]
        can = ((size < K)[:, None, :] & ~held[rows[:, None, None], ar[None, None, :], xs[:, :, None]] & (ar[None, None, :] != h[:, None, None])
               & xv[:, :, None] & (size[rows, h] > 1)[:, None, None])
        m = np.maximum(np.maximum(((lh[:, None] - px) / rh[:, None])[:, :, None], (load[:, None, :] + px[:, :, None]) / rate[:, None, :]), rest[:, None, :])
        m = np.where(can, m, np.inf).reshape(B, -1)
        j = np.argmin(m, 1)
        mv = m[rows, j]
        best = fh * (1 - 1e-9)
        use_move = mv < best
        best = np.where(use_move, mv, best)
        # swaps with pieces of other bins in (bin, expert) order: [B, K, P]
        po = np.argsort(np.where(valid, pb * E + pe, n * E), axis=1, kind="stable")
        yb, ye, py = (np.take_along_axis(a, po, 1) for a in (pb, pe, ppw))
        yv = np.take_along_axis(valid, po, 1) & (yb != h[:, None]) & ~held[rows[:, None], h[:, None], ye]
        ok = yv[:, None, :] & xv[:, :, None] & ~held[rows[:, None, None], yb[:, None, :], xs[:, :, None]] & (py[:, None, :] < px[:, :, None])
        ly, ry = np.take_along_axis(load, yb, 1), np.take_along_axis(rate, yb, 1)
        m2 = np.maximum(np.maximum((lh[:, None, None] - px[:, :, None] + py[:, None, :]) / rh[:, None, None],
                                   (ly[:, None, :] - py[:, None, :] + px[:, :, None]) / ry[:, None, :]), np.take_along_axis(rest, yb, 1)[:, None, :])
        m2 = np.where(ok, m2, np.inf).reshape(B, -1)
        j2 = np.argmin(m2, 1)
        use_swap = m2[rows, j2] < best
        use_move &= ~use_swap & active
        use_swap &= active
        if not (use_move.any() or use_swap.any()):
            break
        r = np.flatnonzero(use_move)  # move piece sel[i] of h to bin b
        i, b = np.divmod(j[r], n)
        x = xs[r, i]
        held[r, h[r], x], held[r, b, x] = False, True
        pb[r, sel[r, i]] = b
        r = np.flatnonzero(use_swap)  # swap piece sel[i] of h with piece po[k] of bin yb
        i, k = np.divmod(j2[r], P)
        x, y, b = xs[r, i], ye[r, k], yb[r, k]
        held[r, h[r], x], held[r, b, x] = False, True
        held[r, b, y], held[r, h[r], y] = False, True
        pb[r, sel[r, i]] = b
        pb[r, po[r, k]] = h[r]
        active &= use_move | use_swap
    return pb


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
