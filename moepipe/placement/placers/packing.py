"""Expert replication and balanced packing for MoE layers (numpy, no plan types), batched over
many independent problems (layers, nodes, variants): one numpy step per piece or copy for all
of them at once, since a Python loop per layer and node dominated the solve at 1,024 devices.

A layer's experts become "pieces": an expert with c copies is c pieces of load w/c (the
runtime splits a replicated expert's tokens evenly over its holders). Pieces are packed onto
EP ranks ("bins") that have a fixed number of slots; no bin holds two copies of one expert.

Bin cost is speed-aware: finish_b = (base_b + load_b) / rate_b, where base is the bin's fixed
work (the dense part of the block, in the same units as load) and rate its relative speed.
With base = 0 and rate = 1 this is plain load balancing (EPLB).
"""
from __future__ import annotations

from itertools import chain
from typing import Optional, Sequence

import numpy as np

TIE_REL = 1e-12  # finish times this close count as equal in `pack_batch`


# ------------------------------------------------------------------ replication


def replicate_counts_batch(w: np.ndarray, n_extra, max_copies, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Copies per expert for C problems at once (w [C, E]): every real expert (`valid` [C, E],
    default all) starts at one copy, padding at zero; then problem c gives `n_extra[c]` more
    copies one at a time to the expert with the largest load per copy (ties: lowest column),
    never above `max_copies[c]`. n_extra / max_copies: [C] or scalars."""
    w = np.asarray(w, dtype=np.float64)
    C, E = w.shape
    valid = np.ones((C, E), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    c = valid.astype(np.int64)
    left = np.array(np.broadcast_to(np.asarray(n_extra, dtype=np.int64), (C,))).clip(min=0)
    cap = np.broadcast_to(np.asarray(max_copies, dtype=np.int64), (C,))[:, None]
    while True:
        live = np.flatnonzero(left > 0)
        if not len(live):
            return c
        cl = c[live]
        per = np.where(valid[live] & (cl < cap[live]), w[live] / np.maximum(cl, 1), -np.inf)
        e = per.argmax(1)
        can = per[np.arange(len(live)), e] > -np.inf
        left[live[~can]] = 0  # every expert is at max_copies
        r = live[can]
        c[r, e[can]] += 1
        left[r] -= 1


def replicate_counts(w: np.ndarray, n_extra: int, max_copies: int) -> np.ndarray:
    """Copies per expert: start at one, then `n_extra` times give one more copy to the expert
    with the largest load per copy (ties: lowest id), never above `max_copies`."""
    return replicate_counts_batch(np.asarray(w, dtype=np.float64)[None], n_extra, max_copies)[0]


# ------------------------------------------------------------------ pieces


def _pad_rows(row: np.ndarray, n_rows: int, *cols: np.ndarray) -> tuple:
    """Entries grouped by ascending `row` into padded [n_rows, width] arrays (one per `cols`,
    in entry order) plus the valid mask."""
    per_row = np.bincount(row, minlength=n_rows)
    width = int(per_row.max()) if n_rows else 0
    pos = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    valid = np.zeros((n_rows, width), dtype=bool)
    valid[row, pos] = True
    out = []
    for x in cols:
        a = np.zeros((n_rows, width), dtype=x.dtype)
        a[row, pos] = x
        out.append(a)
    return (*out, valid)


def pieces_batch(w: np.ndarray, counts: np.ndarray, key: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of C problems (w, counts [C, E]): (column [C, P], load [C, P], valid [C, P]), each
    row heaviest first, ties: lower `key` (default the column, i.e. the expert id)."""
    w = np.asarray(w, dtype=np.float64)
    C, E = w.shape
    n = np.asarray(counts, dtype=np.int64).ravel()
    src = np.repeat(np.arange(C * E), n)
    row, col = np.divmod(src, E)
    load = w.ravel()[src] / n[src]
    if key is not None:  # ties by another key: first order each row by it (a stable sort keeps that order on ties)
        k = np.asarray(key).ravel()[src]
        o = np.lexsort((k, row))
        row, col, load = row[o], col[o], load[o]
    # pieces are grouped by row: sort each padded row by load, heaviest first (stable: ties keep
    # the column / key order), as one lexsort of (key, -load, row) would, without sorting the rows
    col, load, valid = _pad_rows(row, C, col, load)
    o = np.argsort(np.where(valid, -load, np.inf), axis=1, kind="stable")
    return np.take_along_axis(col, o, 1), np.take_along_axis(load, o, 1), np.take_along_axis(valid, o, 1)


def pieces_of(experts: Sequence[int], w: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(expert id, load) of every piece, heaviest first (ties: lower expert id)."""
    ids = np.repeat(np.asarray(experts, dtype=np.int64), counts[np.asarray(experts, dtype=np.int64)])
    loads = np.asarray(w, dtype=np.float64)[ids] / counts[ids]
    order = np.lexsort((ids, -loads))
    return ids[order], loads[order]


# ------------------------------------------------------------------ packing


def pack_batch(ids: np.ndarray, loads: np.ndarray, valid: np.ndarray, cap: np.ndarray, rate: Optional[np.ndarray] = None,
               base: Optional[np.ndarray] = None, n_bins: Optional[np.ndarray] = None) -> np.ndarray:
    """`pack` for C independent problems at once, one numpy step per piece position.

    ids/loads/valid [C, P]: each problem's pieces, heaviest first, padded (valid False);
    cap [C, n]: slots of each bin; rate/base [C, n] (default 1 / 0); n_bins [C]: problem c has
    bins 0..n_bins[c]-1 (default n). Returns the bin of each piece [C, P]: -1 for padding and
    dropped pieces."""
    ids = np.asarray(ids, dtype=np.int64)
    loads = np.asarray(loads, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    C, P = ids.shape
    n = np.shape(cap)[1]
    rate = None if rate is None else np.broadcast_to(np.asarray(rate, dtype=np.float64), (C, n))
    out = np.full((C, P), -1, dtype=np.int64)
    if not valid.any() or n == 0:
        return out
    load = np.zeros((C, n)) if base is None else np.broadcast_to(np.asarray(base, dtype=np.float64), (C, n)).copy()
    exists = np.arange(n)[None, :] < (n if n_bins is None else np.asarray(n_bins)[:, None])
    cap = np.where(exists, cap, 0)
    count = np.zeros((C, n), dtype=np.int64)
    rows = np.arange(C)
    E = int(ids[valid].max()) + 1
    repeats = np.bincount((rows[:, None] * E + ids)[valid]).max() > 1
    held = np.zeros(C * E * n, dtype=bool) if repeats else None  # [problem, expert, bin] flat: only needed when experts have copies
    never = np.iinfo(np.int64).max
    load_f, count_f = load.reshape(-1), count.reshape(-1)  # views: one flat index per (problem, bin) update
    ids_t, loads_t, valid_t = ids.T.copy(), loads.T.copy(), valid.T.copy()  # a piece position's column, contiguous
    base_e = rows * E
    for j in range(P):
        e, x = ids_t[j], loads_t[j]
        shut = count >= cap
        if repeats:
            shut |= held.reshape(C * E, n).take(base_e + e, axis=0)
        fin = load + x[:, None]
        if rate is not None:
            fin /= rate
        np.copyto(fin, np.inf, where=shut)
        fmin = fin.min(1)
        tie = fin <= fmin[:, None] * (1 + TIE_REL)  # among the fastest: fewer pieces, then lower index
        b = np.where(tie, count, never).argmin(1)
        ok = valid_t[j] & (fmin < np.inf)  # no bin can take it: dropped
        if ok.all():
            r = rows
        else:
            r = np.flatnonzero(ok)
            b, e, x = b[r], e[r], x[r]
        out[r, j] = b
        lin = r * n + b
        load_f[lin] += x
        count_f[lin] += 1
        if repeats:
            held[(base_e[r] + e) * n + b] = True
    _fill_empty_bins(out, count, exists)
    return out


def _fill_empty_bins(out: np.ndarray, count: np.ndarray, exists: np.ndarray) -> None:
    """An EP rank with no expert is not a valid plan: in bin order, each empty bin takes the
    last-placed piece of the bin with the most pieces (ties: lowest index) while that has two."""
    C, P = out.shape
    rows = np.arange(C)
    live = np.ones(C, dtype=bool)
    while True:
        empty = exists & (count == 0)
        donor = count.argmax(1)
        live &= empty.any(1) & (count[rows, donor] > 1)  # a donor with one piece stays so: done
        if not live.any():
            return
        r = rows[live]
        b, d = empty[r].argmax(1), donor[r]
        last = P - 1 - (out[r, ::-1] == d[:, None]).argmax(1)
        out[r, last] = b
        count[r, d] -= 1
        count[r, b] += 1


def pack(
    ids: np.ndarray,
    loads: np.ndarray,
    n_bins: int,
    slots: int | Sequence[int],
    rate: Optional[np.ndarray] = None,
    base: Optional[np.ndarray] = None,
) -> list[list[int]]:
    """Greedy largest-first: each piece (given heaviest first) goes to the bin whose finish time
    after taking it is smallest, among bins with a free slot not holding that expert (ties within
    1e-12: fewer pieces, then lower index). A piece no bin can take is dropped (its expert keeps
    fewer copies). Bins left empty take a piece from the bin with the most pieces (every EP rank
    needs one). One problem of `pack_batch`; bins list their experts in placement order."""
    ids = np.asarray(ids, dtype=np.int64)
    cap = np.broadcast_to(np.asarray(slots, dtype=np.int64), (n_bins,))
    pb = pack_batch(ids[None], np.asarray(loads, dtype=np.float64)[None], np.ones((1, len(ids)), dtype=bool), cap[None],
                    None if rate is None else np.asarray(rate)[None], None if base is None else np.asarray(base)[None])[0]
    return [ids[pb == b].tolist() for b in range(n_bins)]


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
        hx = held[rows[:, None], :, xs]  # [B, K, n]: bins already holding x
        # moves: [B, K, n]
        can = ((size < K)[:, None, :] & ~hx & (ar[None, None, :] != h[:, None, None])
               & xv[:, :, None] & (size[rows, h] > 1)[:, None, None])
        m = np.maximum(np.maximum(((lh[:, None] - px) / rh[:, None])[:, :, None], (load[:, None, :] + px[:, :, None]) / rate[:, None, :]), rest[:, None, :])
        m = np.where(can, m, np.inf).reshape(B, -1)
        j = np.argmin(m, 1)
        mv = m[rows, j]
        best = fh * (1 - 1e-9)
        use_move = mv < best
        best = np.where(use_move, mv, best)
        # swaps with a lighter piece y of another bin: one [B, P] pass per piece x of h (cache-sized,
        # no [B, K, P] temporaries); ties: lowest x, then y's (bin, expert), as a scan in that order
        keyy = np.where(valid, pb * E + pe, n * E)  # unique per problem: no bin holds an expert twice
        ly, ry, ryst = np.take_along_axis(load, pb, 1), np.take_along_axis(rate, pb, 1), np.take_along_axis(rest, pb, 1)
        yv = valid & (pb != h[:, None]) & ~held[rows[:, None], h[:, None], pe]
        sw_v, sw_i, sw_k = np.full(B, np.inf), np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
        for i in range(xs.shape[1]):
            pxi = px[:, i:i + 1]
            ok = yv & xv[:, i:i + 1] & ~np.take_along_axis(hx[:, i], pb, 1) & (ppw < pxi)
            if not ok.any():
                continue
            v = np.maximum(np.maximum((lh[:, None] - pxi + ppw) / rh[:, None], (ly - ppw + pxi) / ry), ryst)
            v = np.where(ok, v, np.inf)
            mn = v.min(1)
            k = np.where(v == mn[:, None], keyy, n * E + 1).argmin(1)
            better = mn < sw_v
            sw_v, sw_i, sw_k = np.where(better, mn, sw_v), np.where(better, i, sw_i), np.where(better, k, sw_k)
        use_swap = sw_v < best
        use_move &= ~use_swap & active
        use_swap &= active
        if not (use_move.any() or use_swap.any()):
            break
        r = np.flatnonzero(use_move)  # move piece sel[i] of h to bin b
        i, b = np.divmod(j[r], n)
        x = xs[r, i]
        held[r, h[r], x], held[r, b, x] = False, True
        pb[r, sel[r, i]] = b
        r = np.flatnonzero(use_swap)  # swap piece sel[i] of h with piece k of bin b
        i, k = sw_i[r], sw_k[r]
        x, y, b = xs[r, i], pe[r, k], pb[r, k]
        held[r, h[r], x], held[r, b, x] = False, True
        held[r, b, y], held[r, h[r], y] = False, True
        pb[r, sel[r, i]] = b
        pb[r, k] = h[r]
        active &= use_move | use_swap
    return pb


def node_groups(member_node: Sequence[int]) -> list[list[int]]:
    """EP ranks grouped by node, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for r, n in enumerate(member_node):
        groups.setdefault(int(n), []).append(r)
    return list(groups.values())


def node_members(node: np.ndarray, col: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray]:
    """Experts each of G nodes took, in placement order: (members [C, G, M], valid [C, G, M])
    from the node of each piece [C, P] (-1: none) and its expert `col` [C, P]."""
    C = node.shape[0]
    r, j = np.nonzero(node >= 0)  # row-major: placement order within each row
    key = r * G + node[r, j]
    o = np.argsort(key, kind="stable")
    members, valid = _pad_rows(key[o], C * G, col[r[o], j[o]])
    return members.reshape(C, G, -1), valid.reshape(C, G, -1)


def pack_in_nodes(members: np.ndarray, counts: np.ndarray, w: np.ndarray, scale: np.ndarray, groups: list[list[int]], slots: int,
                  rate: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack each (problem, node)'s experts with their copies onto that node's EP ranks, all
    problems and nodes in one `pack_batch`. members/counts [C, G, M]: expert ids and copies
    (0: padding); w [C, E] expert loads, scale [C] work per unit load; groups: EP ranks of each
    node; rate [ep] member speeds; base [C] each member's fixed work.
    Returns (EP rank [C, G*P], expert [C, G*P]) of every piece; rank -1: padding / dropped."""
    C, G, M = members.shape
    ids = members.reshape(C * G, M)
    wl = np.take_along_axis(w, members.reshape(C, G * M), 1).reshape(C * G, M)
    col, load, ok = pieces_batch(wl, counts.reshape(C * G, M), key=ids)
    size = np.array([len(g) for g in groups])
    ranks = np.zeros((G, size.max()), dtype=np.int64)
    rates = np.ones((G, size.max()))
    for i, g in enumerate(groups):
        ranks[i, :len(g)], rates[i, :len(g)] = g, rate[g]
    node = np.tile(np.arange(G), C)
    local = pack_batch(col, load * np.repeat(scale, G)[:, None], ok, np.full(ranks[node].shape, slots), rates[node],
                       np.repeat(base, G)[:, None], size[node])
    rank = np.where(local >= 0, np.take_along_axis(ranks[node], local.clip(min=0), 1), -1)
    return rank.reshape(C, -1), np.take_along_axis(ids, col, 1).reshape(C, -1)


def every_bin_used(rank: np.ndarray, n: int) -> np.ndarray:
    """[C]: each of the n bins holds at least one piece."""
    C = rank.shape[0]
    r, j = np.nonzero(rank >= 0)
    return (np.bincount(r * n + rank[r, j], minlength=C * n).reshape(C, n) > 0).all(1)


def expert_maps(rank: np.ndarray, expert: np.ndarray, E: int) -> list[list[list[int]]]:
    """Packings given as (EP rank, expert) of every piece [C, P] (rank -1: none) to C expert
    maps (expert -> ascending EP ranks): one lexsort and list slicing, no per-expert sorting."""
    C = rank.shape[0]
    r, j = np.nonzero(rank >= 0)
    e, k = expert[r, j], rank[r, j]
    n = int(k.max()) + 1 if len(k) else 1
    flat = (np.sort((r * E + e) * n + k) % n).tolist()  # (problem, expert, rank) order: one sort of unique integer keys
    ends = np.cumsum(np.bincount(r * E + e, minlength=C * E)).tolist()
    lists = [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]
    return [lists[c * E:(c + 1) * E] for c in range(C)]


def eplb_batch(w: np.ndarray, ep: int, slots: int, member_node: Optional[Sequence[int]] = None) -> list[list[list[int]]]:
    """DeepSeek EPLB for C layers at once (w [C, E]): every EP rank has `slots` slots, all filled.

    Flat: replicate the heaviest experts (largest load per copy) into the ep*slots - E spare
    slots, then pack the copies largest-first onto the least-loaded rank with a free slot.
    Hierarchical (the EP group spans nodes): pack experts onto nodes first (each node takes its
    share of the experts, E * ranks_in_node / ep rounded up), then replicate and pack inside each
    node, so replicas stay in their expert's node. Returns each layer's expert -> EP ranks.
    """
    w = np.asarray(w, dtype=np.float64)
    C, E = w.shape
    groups = node_groups(member_node) if member_node is not None else [list(range(ep))]
    if len(groups) == 1:
        col, load, ok = pieces_batch(w, replicate_counts_batch(w, ep * slots - E, ep))
        return expert_maps(pack_batch(col, load, ok, np.full((C, ep), slots)), col, E)
    size = np.array([len(g) for g in groups])
    col, load, ok = pieces_batch(w, np.ones((C, E), dtype=np.int64))
    node = pack_batch(col, load, ok, np.broadcast_to(-(-E * size // ep), (C, len(groups))))
    members, held = node_members(node, col, len(groups))
    wl = np.take_along_axis(w, members.reshape(C, -1), 1).reshape(held.shape)
    spare = size * slots - held.sum(2)  # [C, G]
    counts = replicate_counts_batch(wl.reshape(-1, wl.shape[2]), spare.ravel(), np.tile(size, C), held.reshape(-1, held.shape[2]))
    rank, expert = pack_in_nodes(members, counts.reshape(held.shape), w, np.ones(C), groups, slots, np.ones(ep), np.zeros(C))
    return expert_maps(rank, expert, E)


def eplb_layer(w: np.ndarray, ep: int, slots: int, member_node: Optional[Sequence[int]] = None) -> list[list[int]]:
    """`eplb_batch` for one layer: expert -> EP ranks."""
    return eplb_batch(np.asarray(w, dtype=np.float64)[None], ep, slots, member_node)[0]


# ------------------------------------------------------------------ origin-aware packing


def _plan_copies(n: np.ndarray, dem: np.ndarray, fair: np.ndarray, left: np.ndarray, node_slots: np.ndarray, size: np.ndarray) -> None:
    """Copies per (expert, node) for balance, in place: n [C, E, G] (0s), dem [C, E, G] tokens
    for e starting in node g, fair [C] a rank's fair share, left [C] the copy budget (spent
    here), node_slots / size [G] slots and ranks per node. Each expert starts with one copy in
    the node of its most demand. Under the nearest-replica rule a node's copies share its
    demand and the demand of nodes without a copy spreads over all copies, so while an
    expert's heaviest copy carries more than a fair share, the heaviest such expert gets one
    more copy: in its node of most demand without a copy, else in the node whose copies carry
    the most each (up to one per rank and the node's slots)."""
    C, E, G = dem.shape
    rows = np.arange(C)
    n[rows[:, None], np.arange(E)[None, :], dem.argmax(2)] = 1
    limit = np.asarray(node_slots)  # every expert's first copy counts in its node (single copies may move later)

    def heaviest(d, k):  # [..., G] -> [...]: the heaviest copy's demand (demand from nodes without a copy spread over the copies)
        return np.where(k > 0, d / np.maximum(k, 1), -np.inf).max(-1) + (d * (k == 0)).sum(-1) / k.sum(-1)

    heavy = heaviest(dem, n)  # [C, E], kept current: a round changes one expert per problem
    taken = n.sum(1)  # [C, G] copies per node
    for _ in range(int(left.max()) if C else 0):
        e = heavy.argmax(1)
        de, ne = dem[rows, e], n[rows, e]  # [C, G]
        room = (ne < size[None, :]) & (taken < limit[None, :])
        # a node without a copy takes its own demand home first (locality and relief), else the
        # node whose copies carry the most demand each
        bare = room & (ne == 0) & (de > 0)
        g = np.where(bare.any(1), np.where(bare, de, -np.inf).argmax(1), np.where(room & (ne > 0), de / np.maximum(ne, 1), -np.inf).argmax(1))
        live = (left > 0) & (heavy[rows, e] > fair * (1 + 1e-9)) & room[rows, g]
        if not live.any():
            return
        r, er, gr = rows[live], e[live], g[live]
        n[r, er, gr] += 1
        taken[r, gr] += 1
        left[live] -= 1
        heavy[r, er] = heaviest(dem[r, er], n[r, er])


def pack_by_origin(w: np.ndarray, origins: np.ndarray, cost: np.ndarray, node_of: Sequence[int], slots: int, rate: np.ndarray,
                   base: np.ndarray, scale: np.ndarray, slack: float, n_replicas, balance_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Homes and replicas that keep each expert's tokens near where they start, for C problems.

    w [C, E] expert loads; origins [C, ep, E] of those loads per source EP rank; cost [ep, ep]
    per token sent from rank s to rank d (e.g. 1/bandwidth, 0 on the diagonal); node_of [ep];
    `slots` per rank; rate [ep] member speeds; base [C] each member's fixed work; scale [C]
    work per unit load; `n_replicas` [C] (or scalar) extra copies at most.

    1. Copies for balance (`balance_first`, `_plan_copies`): per (expert, node), while the
       heaviest copy exceeds a rank's fair share (within the budget).
    2. Pieces (one per planned copy, in its node, of the load the rule sends it; else one per
       expert), heaviest first, each on the rank with
       the cheapest traffic from the expert's sources that no copy in their node serves yet (the
       nearest-replica rule keeps those tokens in the node), among ranks with a free slot not
       holding the expert whose expert work stays within `slack` x its balanced share (else
       the rank finishing first); ties: the rank finishing first.
    3. With the budget left, copies for locality one at a time: for the (expert, node) with the
       most tokens from a node holding no copy of it, preferring experts of the rank receiving
       the most cross-node tokens, on the node's rank that finishes first with a free slot.
    Returns (EP rank [C, P], expert [C, P]) of every piece, rank -1 for padding, as
    `expert_maps` reads them."""
    w = np.asarray(w, dtype=np.float64)
    origins = np.asarray(origins, dtype=np.float64)
    C, E = w.shape
    ep = len(rate)
    rows = np.arange(C)
    node_of = np.asarray(node_of)
    rate = np.asarray(rate, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    groups = np.unique(node_of)
    node_ix = np.searchsorted(groups, node_of)  # EP rank -> node index
    in_node = node_ix[None, :] == np.arange(len(groups))[:, None]  # [G, ep]
    left = np.array(np.broadcast_to(np.asarray(n_replicas, dtype=np.int64), (C,)))
    G = len(groups)
    size = in_node.sum(1)  # ranks per node
    demand = np.matmul(in_node.astype(np.float64), origins)  # [C, G, E] tokens from node g
    dem = demand.transpose(0, 2, 1)  # [C, E, G]
    n = np.zeros((C, E, G), dtype=np.int64)  # copies of e planned in node g (balance_first)
    if balance_first:
        _plan_copies(n, dem, w.sum(1) / ep, left, slots * size, size)
    # pieces: an expert with planned copies gives one piece per copy, fixed to its node, of the
    # load the rule sends it (its node's demand over its copies there, plus an even part of the
    # demand from nodes without a copy); any other expert one free piece of its whole load
    multi = n.sum(2) > 1
    per_copy = dem / np.maximum(n, 1) + ((dem * (n == 0)).sum(2) / np.maximum(n.sum(2), 1))[:, :, None]
    cnt = np.concatenate([np.where(multi[:, :, None], n, 0), (~multi)[:, :, None].astype(np.int64)], 2)  # [C, E, G+1]; G: free
    src = np.repeat(np.arange(C * E * (G + 1)), cnt.ravel())
    row, rem = np.divmod(src, E * (G + 1))
    pe, pg = np.divmod(rem, G + 1)
    pl = np.concatenate([per_copy, w[:, :, None]], 2).ravel()[src]
    o = np.lexsort((pe, -pl, row))
    col, load, pnode, ok = _pad_rows(row[o], C, pe[o], pl[o], pg[o])
    node_ok = np.vstack([in_node, np.ones((1, ep), dtype=bool)])  # [G+1, ep]: a piece's allowed ranks
    work = np.repeat(np.asarray(base, dtype=np.float64)[:, None], ep, 1)
    # a rank may take up to `slack` x its balanced share of the expert work (beside its fixed work)
    balanced = (work.sum(1) + scale * w.sum(1)) / rate.sum()  # [C] the balanced finish time
    cap = work + slack * np.maximum(balanced[:, None] * rate - work, 0.0)  # [C, ep] work allowed
    count = np.zeros((C, ep), dtype=np.int64)
    held = np.zeros((C, E, ep), dtype=bool)
    unserved = np.ones((C, ep, E), dtype=bool)  # source s has no copy of e in its node yet
    for j in range(col.shape[1]):
        e, x = col[:, j], load[:, j] * scale
        after = work + x[:, None]
        fin = np.where((count < slots) & ~held[rows, e] & node_ok[pnode[:, j]], after / rate, np.inf)
        fmin = fin.min(1)
        allowed = ((after <= cap * (1 + 1e-9)) & np.isfinite(fin)) | (fin <= fmin[:, None] * (1 + 1e-9))
        tc = (origins[rows, :, e] * unserved[rows, :, e]) @ cost  # [C, ep] traffic cost of this piece on d
        t = np.where(allowed, tc, np.inf)
        tmin = t.min(1)
        near = t <= tmin[:, None] + 1e-9 * np.abs(tmin)[:, None]  # cheapest traffic, then first to finish
        b = np.where(near, fin, np.inf).argmin(1)
        r = rows[ok[:, j] & np.isfinite(fmin)]
        er, br = e[r], b[r]
        held[r, er, br] = True
        unserved[r, :, er] &= (node_ix[None, :] != node_ix[br][:, None])
        work[r, br] += x[r]
        count[r, br] += 1
    # every rank needs an expert: an empty rank takes the lightest piece of the fullest rank
    for c, b in zip(*np.nonzero(count == 0)):
        d = count[c].argmax()
        cand = np.flatnonzero(held[c, :, d] & ~held[c, :, b])
        if count[c, d] < 2 or not len(cand):
            continue
        e = cand[(w[c, cand] / held[c, cand].sum(1)).argmin()]
        piece = w[c, e] / held[c, e].sum() * scale[c]
        held[c, e, d], held[c, e, b] = False, True
        count[c, d] -= 1
        count[c, b] += 1
        work[c, d] -= piece
        work[c, b] += piece
    has = np.matmul(held.astype(np.float64), in_node.T.astype(np.float64)).transpose(0, 2, 1) > 0  # [C, G, E]
    # cross-node tokens each rank receives (remote sources spread evenly over the copies):
    # locality copies go first where they relieve the busiest receiver
    cross = node_of[:, None] != node_of[None, :]
    remote = origins * ~has[:, node_ix, :]  # [C, ep, E] tokens whose node holds no copy
    recv_x = (np.matmul(remote / held.sum(2)[:, None, :], held.astype(np.float64)) * cross).sum(1)
    left = np.minimum(left, (slots * ep - count.sum(1)).clip(min=0))
    while (left > 0).any():
        room = ((count < slots)[:, None, :] & in_node[None]).any(2)  # [C, G]
        gain = np.where(~has & room[:, :, None], demand, -np.inf)  # [C, G, E]
        h = recv_x.argmax(1)
        mine = np.where(held[rows, :, h][:, None, :], gain, -np.inf).reshape(C, -1)  # copies of the busiest receiver's experts
        gain = gain.reshape(C, -1)
        k = np.where(mine.max(1) > 0, mine.argmax(1), gain.argmax(1))
        live = (left > 0) & (gain[rows, k] > 0)
        if not live.any():
            break
        r = rows[live]
        g, e = np.divmod(k[r], E)
        moved = demand[r, g, e]
        fin = np.where(in_node[g] & (count[r] < slots), (work[r] + (moved * scale[r])[:, None]) / rate, np.inf)
        b = fin.argmin(1)
        owners = held[r, e]  # the copies those tokens went to before (approximately evenly)
        part = owners * (moved / owners.sum(1))[:, None]
        work[r] -= part * scale[r, None]
        recv_x[r] -= part
        work[r, b] += moved * scale[r]
        held[r, e, b] = True
        has[r, g, e] = True
        count[r, b] += 1
        left[r] -= 1
    r, e, d = np.nonzero(held)
    rank, expert, valid = _pad_rows(r, C, d, e)
    return np.where(valid, rank, -1), expert
