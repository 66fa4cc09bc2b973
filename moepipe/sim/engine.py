"""Discrete-event execution of a per-rank action order.

Each pipeline rank runs its actions strictly in order, one at a time (one compute stream);
an action starts when the rank is free and its inputs have arrived:
  F(s, i): F(s-1, i) finished + the activation transfer (none for stage 0 or on the same rank)
  B/I(s, i): F(s, i) finished and B/I(s+1, i) finished + the gradient transfer (last stage: F only)
  W(s, i): I(s, i) finished (always earlier on the same rank)
Every action also pays a fixed `overhead` on its rank (the runtime's own cost per action:
schedule bookkeeping, posting and completing its sends/receives; an overlapped F+B pair pays
it twice). Transfers run on a separate stream and never contend. The order is swept rank by rank until
no rank can advance; a stall with work left is a deadlock in the order (an error).
Chains (several model replicas, e.g. Chimera's two pipelines) are read off the order: stage
s+1 continues stage s's chain when they run the same microbatches; a chain's first stage
waits for no activation and its last for no gradient.
Everything here is deterministic: no clocks, no randomness, fixed iteration order.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from moepipe.sim.schedules import Action, Order

EVENT_KINDS = ("F", "B", "I", "W", "FB", "send", "recv", "a2a", "idle")
COMPUTE, COMM = 0, 1  # lanes


@dataclass
class Timeline:
    """Events as parallel arrays (one row per event); `kind` indexes EVENT_KINDS."""

    rank: np.ndarray
    lane: np.ndarray
    kind: np.ndarray
    stage: np.ndarray
    mb: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.rank)

    def select(self, kind: str) -> np.ndarray:
        return self.kind == EVENT_KINDS.index(kind)

    def rows(self):
        """Iterate (rank, lane, kind name, stage, mb, start, end) tuples."""
        for r, l, k, s, i, a, b in zip(self.rank, self.lane, self.kind, self.stage, self.mb, self.start, self.end):
            yield int(r), int(l), EVENT_KINDS[k], int(s), int(i), float(a), float(b)


@dataclass
class EngineResult:
    makespan: float
    busy: np.ndarray  # [pp] seconds each rank spent in actions
    timeline: Timeline
    inflight: dict[int, np.ndarray]  # rank -> [k, n_stages] in-flight microbatches per stage after each forward
    n_actions: int
    # rank -> [k, n_stages] of those, the microbatches past their I (waiting for W)
    inflight_past_i: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


def _dur(a: Action, comp: np.ndarray, a2a: np.ndarray) -> tuple[float, float]:
    """(duration, blocking all-to-all part) of one action."""
    s = a.stage
    if a.kind == "F":
        return comp[s, 0] + a2a[s, 0], a2a[s, 0]
    if a.kind == "B":
        return comp[s, 1] + comp[s, 2] + a2a[s, 1], a2a[s, 1]
    if a.kind == "I":
        return comp[s, 1] + a2a[s, 1], a2a[s, 1]
    if a.kind == "W":
        return comp[s, 2], 0.0
    f, b = a.pair  # overlapped pair: one chunk's all-to-all hides behind the other's compute
    cf, af = comp[f.stage, 0], a2a[f.stage, 0]
    cb, ab = comp[b.stage, 1] + comp[b.stage, 2], a2a[b.stage, 1]
    return max(cf + cb, af + ab, cf + af, cb + ab), af + ab


def run(order: Order, stage_to_rank: list[int], m: int, comp: np.ndarray, a2a: np.ndarray, send: np.ndarray,
        overhead: Any = 0.0) -> EngineResult:
    """Execute `order`; comp/a2a are [n_stages, 3] seconds (F, B, W), send[s] the s -> s+1 transfer,
    `overhead` seconds per action (a scalar or one per pipeline rank)."""
    S, pp = len(stage_to_rank), len(order)
    over = np.broadcast_to(np.asarray(overhead, dtype=np.float64), (pp,)).tolist()
    comp_a, a2a_a = np.asarray(comp, dtype=np.float64), np.asarray(a2a, dtype=np.float64)
    send_l = np.asarray(send, dtype=np.float64).tolist()
    link = _chain_links(order, S)
    hop = [link[s] and stage_to_rank[s] != stage_to_rank[s + 1] for s in range(S - 1)]
    fdone = [[None] * m for _ in range(S)]  # when F(s, i) / B or I(s, i) finished
    gdone = [[None] * m for _ in range(S)]
    ev: list[tuple] = []
    ready = _arrival_rule(fdone, gdone, send_l, hop, link + [False])
    finish = _completion_rule(fdone, gdone, send_l, hop, stage_to_rank, S, ev)
    snaps, account = _activation_counter(pp, S)
    free, busy, total = _sweep(order, ready, finish, account, comp_a, a2a_a, over, ev)
    return _result(ev, free, busy, snaps, S, total)


def _chain_links(order: Order, S: int) -> list[bool]:
    """link[s]: stage s hands its activations to stage s+1 (the two run the same microbatches);
    False where one chain (model replica) ends and the next begins."""
    mbs: list[set] = [set() for _ in range(S)]
    for acts in order.values():
        for a in acts:
            for x in a.leaves():
                if x.kind == "F":
                    mbs[x.stage].add(x.mb)
    return [bool(mbs[s] & mbs[s + 1]) for s in range(S - 1)]


def _arrival_rule(fdone, gdone, send_l, hop, link):
    """ready(action): when its inputs have arrived (the rules in the module docstring), or None
    while one is still missing."""

    def ready(a: Action):
        s, i = a.stage, a.mb
        if a.kind == "F":
            if s == 0 or not link[s - 1]:
                return 0.0
            t = fdone[s - 1][i]
            return None if t is None else t + (send_l[s - 1] if hop[s - 1] else 0.0)
        if a.kind in ("B", "I"):
            t = fdone[s][i]
            if t is None or not link[s]:
                return t
            g = gdone[s + 1][i]
            return None if g is None else max(t, g + (send_l[s] if hop[s] else 0.0))
        if a.kind == "W":
            return gdone[s][i]
        tf, tb = ready(a.pair[0]), ready(a.pair[1])
        return None if tf is None or tb is None else max(tf, tb)

    return ready


def _completion_rule(fdone, gdone, send_l, hop, stage_to_rank, S, ev):
    """finish(action, rank, end): record the finish time and the send/recv events of the
    activation (F) or gradient (B/I) it hands to the neighbouring stage on another rank."""
    K = {k: i for i, k in enumerate(EVENT_KINDS)}

    def finish(a: Action, r: int, end: float) -> None:
        s, i = a.stage, a.mb
        if a.kind == "F":
            fdone[s][i] = end
            if s + 1 < S and hop[s]:  # hop: same chain, another rank
                q = stage_to_rank[s + 1]
                ev.append((r, COMM, K["send"], s, i, end, end + send_l[s]))
                ev.append((q, COMM, K["recv"], s + 1, i, end, end + send_l[s]))
        elif a.kind in ("B", "I"):
            gdone[s][i] = end
            if s > 0 and hop[s - 1]:
                q = stage_to_rank[s - 1]
                ev.append((r, COMM, K["send"], s, i, end, end + send_l[s - 1]))
                ev.append((q, COMM, K["recv"], s - 1, i, end, end + send_l[s - 1]))

    return finish


def _activation_counter(pp: int, S: int):
    """(snapshots, account): account(action, rank) counts each rank's in-flight microbatches per
    stage and snapshots them after every forward: (held until B or W, of those past their I)."""
    counts = {r: {} for r in range(pp)}
    past_i = {r: {} for r in range(pp)}  # microbatches between their I and their W
    snaps: dict[int, list[list[int]]] = {r: [] for r in range(pp)}
    snaps_w: dict[int, list[list[int]]] = {r: [] for r in range(pp)}

    def account(a: Action, r: int) -> None:
        c, w = counts[r], past_i[r]
        if a.kind == "F":
            c[a.stage] = c.get(a.stage, 0) + 1
            snaps[r].append([c.get(s, 0) for s in range(S)])
            snaps_w[r].append([w.get(s, 0) for s in range(S)])
        elif a.kind == "I":
            w[a.stage] = w.get(a.stage, 0) + 1
        elif a.kind in ("B", "W"):  # activations live until the weight gradient is done
            c[a.stage] -= 1
            if a.kind == "W":
                w[a.stage] -= 1
        elif a.kind == "FB":
            account(a.pair[0], r)
            account(a.pair[1], r)

    return (snaps, snaps_w), account


def _sweep(order: Order, ready, finish, account, comp_a, a2a_a, over, ev) -> tuple[list[float], list[float], int]:
    """Sweep the ranks in order, running each rank's next actions while their inputs are there,
    until all actions ran; (free time per rank, busy seconds per rank, number of actions)."""
    pp = len(order)
    K = {k: i for i, k in enumerate(EVENT_KINDS)}
    ptr, free, busy = [0] * pp, [0.0] * pp, [0.0] * pp
    total = sum(len(v) for v in order.values())
    done = 0
    while done < total:
        progress = False
        for r in range(pp):
            acts = order[r]
            while ptr[r] < len(acts):
                a = acts[ptr[r]]
                t = ready(a)
                if t is None:
                    break
                start = max(free[r], t)
                if start > free[r]:
                    ev.append((r, COMPUTE, K["idle"], -1, -1, free[r], start))
                d, comm = _dur(a, comp_a, a2a_a)
                d += over[r] * (2 if a.kind == "FB" else 1)
                end = start + d
                ev.append((r, COMPUTE, K[a.kind], a.stage, a.mb, start, end))
                if comm > 0:
                    ev.append((r, COMM, K["a2a"], a.stage, a.mb, end - comm if a.kind != "FB" else start, end if a.kind != "FB" else start + comm))
                if a.kind == "FB":
                    finish(a.pair[0], r, end)
                    finish(a.pair[1], r, end)
                else:
                    finish(a, r, end)
                account(a, r)
                free[r], busy[r] = end, busy[r] + d
                ptr[r] += 1
                done += 1
                progress = True
        if not progress:
            stuck = {r: str(order[r][ptr[r]]) for r in range(pp) if ptr[r] < len(order[r])}
            raise RuntimeError(f"schedule deadlocks: next actions per rank {stuck}")
    return free, busy, total


def _result(ev: list[tuple], free: list[float], busy: list[float], snaps, S: int, total: int) -> EngineResult:
    """Close every rank's timeline with idle time up to the makespan and pack the events."""
    pp = len(free)
    makespan = max(free) if free else 0.0
    idle = EVENT_KINDS.index("idle")
    for r in range(pp):
        if free[r] < makespan:
            ev.append((r, COMPUTE, idle, -1, -1, free[r], makespan))
    arr = np.array(ev, dtype=np.float64) if ev else np.zeros((0, 7))
    tl = Timeline(*(arr[:, j].astype(np.int64) for j in range(5)), arr[:, 5], arr[:, 6])
    snaps, snaps_w = snaps

    def arr(x):
        return {r: (np.array(x[r], dtype=np.int64) if x[r] else np.zeros((1, S), dtype=np.int64)) for r in range(pp)}
    return EngineResult(makespan, np.array(busy), tl, arr(snaps), total, arr(snaps_w))


# ------------------------------------------------------------------ makespan only, order compiled once
#
# Which action the sweep runs next depends only on which inputs exist, never on times: the
# execution order, each action's inputs and the in-flight snapshots are properties of the order
# alone. `compile_order` records them once; `makespan` then replays the same max/+ arithmetic
# over flat lists (no events, no closures), so its makespan equals run()'s bit for bit. The
# placers' evaluator runs it for every plan it scores.


@dataclass(frozen=True)
class CompiledOrder:
    """An order as the sweep executes it: per action (in that order) its rank, up to three
    inputs (index of the action that produces it, stage whose send it pays or -1; index n: none),
    and what its duration is made of (stage of its forward part, of its B/I part, of its W part
    (B and W), or -1; whether it is an overlapped pair)."""

    n_actions: int
    pp: int
    rank: np.ndarray
    dep: np.ndarray  # [3, n]
    dep_send: np.ndarray  # [3, n]
    f_stage: np.ndarray
    b_stage: np.ndarray
    w_stage: np.ndarray
    pair: np.ndarray  # bool
    inflight: dict
    inflight_past_i: dict


@dataclass
class MakespanResult:
    makespan: float
    inflight: dict  # as EngineResult's
    inflight_past_i: dict
    n_actions: int


_COMPILED: dict = {}  # key of (order's actions by identity, stage_to_rank, m) -> (order, CompiledOrder)


def compile_order(order: Order, stage_to_rank: list[int], m: int) -> CompiledOrder:
    """The order's execution (see CompiledOrder), cached on the identity of its actions (the
    schedule programs are cached, so their actions are shared between calls)."""
    key = (tuple(stage_to_rank), m, tuple((r, tuple(map(id, acts))) for r, acts in order.items()))
    hit = _COMPILED.get(key)
    if hit is not None:
        return hit[1]
    S, pp = len(stage_to_rank), len(order)
    link = _chain_links(order, S)
    hop = [link[s] and stage_to_rank[s] != stage_to_rank[s + 1] for s in range(S - 1)]
    link = link + [False]  # the last stage waits for no gradient
    fnode: list[list[Optional[int]]] = [[None] * m for _ in range(S)]  # which action finished F(s, i) / B or I(s, i)
    gnode: list[list[Optional[int]]] = [[None] * m for _ in range(S)]

    def inputs(a: Action):  # (action index, send stage or -1) of each input, None while one is missing (= _arrival_rule)
        s, i = a.stage, a.mb
        if a.kind == "F":
            if s == 0 or not link[s - 1]:
                return []
            t = fnode[s - 1][i]
            return None if t is None else [(t, s - 1 if hop[s - 1] else -1)]
        if a.kind in ("B", "I"):
            t = fnode[s][i]
            if t is None or not link[s]:
                return None if t is None else [(t, -1)]
            g = gnode[s + 1][i]
            return None if g is None else [(t, -1), (g, s if hop[s] else -1)]
        if a.kind == "W":
            g = gnode[s][i]
            return None if g is None else [(g, -1)]
        x, y = inputs(a.pair[0]), inputs(a.pair[1])
        return None if x is None or y is None else x + y

    (snaps, snaps_w), account = _activation_counter(pp, S)
    rows = []  # (rank, inputs, f stage, b stage, w stage, pair)
    ptr = [0] * pp
    total = sum(len(v) for v in order.values())
    while len(rows) < total:
        progress = False
        for r in range(pp):
            acts = order[r]
            while ptr[r] < len(acts):
                a = acts[ptr[r]]
                ins = inputs(a)
                if ins is None:
                    break
                j = len(rows)
                fs = bs = ws = -1
                for x in a.leaves():
                    if x.kind == "F":
                        fnode[x.stage][x.mb] = j
                        fs = x.stage
                    elif x.kind in ("B", "I"):
                        gnode[x.stage][x.mb] = j
                        bs = x.stage
                        ws = x.stage if x.kind == "B" else -1
                    else:  # W
                        ws = x.stage
                rows.append((r, ins, fs, bs, ws, a.kind == "FB"))
                account(a, r)
                ptr[r] += 1
                progress = True
        if not progress:
            stuck = {r: str(order[r][ptr[r]]) for r in range(pp) if ptr[r] < len(order[r])}
            raise RuntimeError(f"schedule deadlocks: next actions per rank {stuck}")
    n = len(rows)
    dep = np.full((3, n), n, dtype=np.int64)
    dep_send = np.full((3, n), -1, dtype=np.int64)
    for j, (_, ins, *_rest) in enumerate(rows):
        for k, (d, s) in enumerate(ins):
            dep[k, j], dep_send[k, j] = d, s
    col = lambda k: np.array([x[k] for x in rows], dtype=np.int64).reshape(n)  # noqa: E731

    def arr(x):
        return {r: (np.array(x[r], dtype=np.int64) if x[r] else np.zeros((1, S), dtype=np.int64)) for r in range(pp)}
    out = CompiledOrder(n, pp, col(0), dep, dep_send, col(2), col(3), col(4), np.array([x[5] for x in rows], dtype=bool).reshape(n),
                        arr(snaps), arr(snaps_w))
    if len(_COMPILED) > 32:
        _COMPILED.clear()
    _COMPILED[key] = (order, out)  # the order keeps its actions (and so the key's ids) alive
    return out


def makespan(order: Order, stage_to_rank: list[int], m: int, comp: np.ndarray, a2a: np.ndarray, send: np.ndarray,
             overhead: Any = 0.0) -> MakespanResult:
    """run()'s makespan (bit for bit) and in-flight snapshots, without its timeline."""
    c = compile_order(order, stage_to_rank, m)
    S = len(stage_to_rank)
    z = np.zeros((1, 3))
    comp_p = np.concatenate([np.asarray(comp, dtype=np.float64).reshape(S, 3), z])  # row -1: nothing
    a2a_p = np.concatenate([np.asarray(a2a, dtype=np.float64).reshape(S, 3), z])
    send_p = np.append(np.asarray(send, dtype=np.float64).reshape(-1), 0.0)  # index -1 (no send): 0
    cf, af = comp_p[c.f_stage, 0], a2a_p[c.f_stage, 0]
    cb = comp_p[c.b_stage, 1] + comp_p[c.w_stage, 2]  # B: comp[s, 1] + comp[s, 2]; I: + 0; W: 0 + comp[s, 2]
    ab = a2a_p[c.b_stage, 1]
    dur = np.where(c.pair, np.maximum(np.maximum(cf + cb, af + ab), np.maximum(cf + af, cb + ab)), cf + af + cb + ab)  # = _dur
    over = np.broadcast_to(np.asarray(overhead, dtype=np.float64), (c.pp,))
    dur = dur + over[c.rank] * np.where(c.pair, 2.0, 1.0)
    lat = send_p[c.dep_send]  # [3, n]; -1 (no send) reads the trailing 0
    end = [0.0] * (c.n_actions + 1)  # index n: a missing input, 0
    free = [0.0] * c.pp
    for j, (r, d0, l0, d1, l1, d2, l2, du) in enumerate(zip(c.rank.tolist(), *(x for k in range(3) for x in (c.dep[k].tolist(), lat[k].tolist())),
                                                             dur.tolist())):
        e = max(free[r], end[d0] + l0, end[d1] + l1, end[d2] + l2) + du  # times are >= 0: a missing input (0) never wins
        end[j] = e
        free[r] = e
    return MakespanResult(max(free) if free else 0.0, c.inflight, c.inflight_past_i, c.n_actions)
