"""The fast path of two-speed placement (issue 15, item 3): per-step *shadow* copies of hot
experts, and their cost in the cost model. Pure numpy; no torch, no process group.

A shadow of expert e on EP rank r is a copy that lives for one step (or a few): the home
(the plan's holders of e) keeps the parameters and the AdamW state; before the layer's
forward the home sends e's weights to r, r serves a share of e's tokens like any replica (the
runtime's nearest-replica rule, `cost_model.split_over_copies`), and after the backward r
sends e's gradient back to the home, which adds it before the optimizer step. No optimizer
state moves, so a shadow can be placed or dropped every step.

The rule (`choose_shadows`). Per microbatch, one MoE layer on its EP group lasts

    T(S) = sum over phases p of  max_r comp_p,r(S)  +  a2a_p(S)

(exactly `cost_model.stage_costs`' contribution of the layer: F and B carry dispatch +
combine, W none; with activation checkpointing B also recomputes F), where S is the set of
shadows, which changes the tokens each rank computes and receives. Over a step of m
microbatches a set S pays when

    m * (T({}) - T(S))  >  X(S),    X(S) = A(W_S) + A(G_S)

X is the per-step transfer: W_S[h, r] = the weight bytes of every shadow home h -> r (one
all-to-all of those bytes: `Topology.all_to_all_time`, so each link's own bandwidth and
latency count, NVLink and NIC ports run in parallel, and several shadows fed by one home
serialise on its port) and G_S the gradient bytes back (r -> h). The transfers are charged in
full, not overlapped with compute (an upper bound on their cost). The greedy builds S step
by step: the hottest copy on the bottleneck rank b (largest compute + receive time) gets
shadows on the ranks where they end lowest (a rank's time after taking the shadow's share,
plus the shadow's own transfer, in step seconds; ranks with a free slot and no copy of it).
A step adds one shadow of the hottest of b's (four hottest) copies that has a target ending
below b's time; or, when the hottest has none (an expert hotter than a rank's fair share
overloads any one target), the fewest shadows of it that all end below b, if they take more
of b's tokens per slot than the single shadow of a cooler copy. The greedy stops when nothing
on b can be placed, no slot is free, PATIENCE steps in a row did not raise the best net by
more than TOL of the layer's step time, or the net can no longer beat the best (the saving is
bounded by the compute of a perfectly balanced layer with free all-to-all). S is the step
prefix with the largest m*(T({}) - T(S)) - X(S) (so two equally hot ranks, where one shadow
alone saves nothing, are still handled), empty when none is positive. In the loop the tokens of an expert split evenly over its copies and the
all-to-all is each rank's receive time of an even dispatch (send streams kept at their start);
the chosen S is then re-checked with the exact rule (the nearest-replica split and
`exchange_time`, the cost model's own numbers) and dropped if it does not pay there.

How it differs from FasterMoE's rule of thumb (shadow e when 3 x the compute of e's tokens +
4 x the time to send them exceeds the broadcast of e's parameters): theirs compares one
expert's own work with its broadcast; ours compares the *layer's critical path* (a shadow
only helps if it lowers the slowest rank's compute or all-to-all), counts m microbatches per
step against one broadcast and one gradient return per step, takes the link class of each
home -> shadow pair (intra- vs inter-node) from the topology, lets the shadow take the
tokens nearest to it (the all-to-all also shrinks when the shadow sits in the tokens' node),
and counts the recomputed forward under checkpointing (their "3 x" is F + B + W).

Interfaces:
  layer_setup(cm, topology, group, layer, microbatches, ...) -> ShadowLayer  (what choose_shadows needs)
  choose_shadows(load, holders, setup, shadow_slots, exact=True) -> ShadowChoice
  layer_step_time(setup, holders, load, shadows=None) -> LayerStepTime   exact per-step seconds of the layer
  transfer_matrix(holders, shadows, ep) -> [ep, ep] home -> shadow copies; shadow_transfer_s(...)
  with_shadows(holders, shadows) -> holders with the shadows appended (the exact rule's copies)
  shadowed_expert_map(plan, shadows_by_layer) -> expert_map for the simulator / Evaluator
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from moepipe.config import ConfigError
from moepipe.placement.cost_model import CostModel, exchange_time, layer_exchange, rule_local_size, rule_nodes
from moepipe.placement.topology import Topology

Shadows = dict  # expert -> tuple of extra EP ranks (shadow copies)
# the greedy stops after this many shadows in a row that did not raise the best net saving: a
# tie among up to this many equally hot ranks is still crossed (one shadow alone saves nothing there)
PATIENCE = 8
SCALAR_UPDATE = 6  # up to this many changed ranks, the greedy updates elements rather than whole arrays (faster)
TOL = 1e-3  # a step whose net gain is under this share of the layer's step time does not restart the patience


@dataclass
class ShadowLayer:
    """One MoE layer on one EP group, as the cost model sees it (per microbatch unless stated)."""

    topology: Topology
    group: np.ndarray  # [ep] global ranks of the EP group
    dense_s: np.ndarray  # [3, ep] seconds of the non-expert part per phase (F, B, W)
    expert_s: np.ndarray  # [3, ep] seconds per routed token-expert assignment per phase
    dense_work: np.ndarray  # [3] FLOP-equivalents per token (exact evaluation repeats the cost model's arithmetic)
    expert_work: np.ndarray  # [3]
    tokens: float  # tokens each member computes the dense part for (T / ep)
    rate: np.ndarray  # [ep] effective FLOP/s
    assign: float  # token-expert assignments per microbatch (T * top_k)
    bytes_per_token: float  # hidden vector bytes sent per assignment
    microbatches: int
    checkpointing: bool
    a2a: str  # flat | hierarchical (cost_model.a2a)
    weight_bytes: float  # one expert's weights, home -> shadow, per step
    grad_bytes: float  # one expert's gradient, shadow -> home, per step
    rule_nodes: np.ndarray  # [ep] the nearest-replica rule's node per EP rank
    # derived (the greedy loop's per-rank coefficients)
    inv_bw: np.ndarray = field(init=False)
    lat: np.ndarray = field(init=False)
    _greedy: Optional[dict] = field(init=False, default=None, repr=False)

    def __post_init__(self):
        g = np.asarray(self.group, dtype=np.int64)
        self.group = g
        inv = 1.0 / self.topology.bandwidth[np.ix_(g, g)]
        np.fill_diagonal(inv, 0.0)
        self.inv_bw = inv
        self.lat = self.topology.latency[np.ix_(g, g)].copy()
        np.fill_diagonal(self.lat, 0.0)

    @property
    def ep(self) -> int:
        return len(self.group)

    def greedy_terms(self) -> dict:
        """The greedy loop's per-rank coefficients (per microbatch, all phases), computed once
        per layer setup: a step's decision reuses them."""
        if self._greedy is not None:
            return self._greedy
        ep = self.ep
        node = self.topology.node_of[self.group]
        same = node[:, None] == node[None, :]
        intra, inter = same & ~np.eye(ep, dtype=bool), ~same
        ph = np.array([1.0, 1.0 + self.checkpointing, 1.0])  # F, B (+ recomputed F), W
        bpt = self.bytes_per_token
        # even dispatch: every source sends L_j / ep to rank j; streams by link class run in parallel
        rin = np.stack([(self.inv_bw * mk).sum(0) for mk in (intra, inter)]) * bpt / ep  # [2, ep] recv s per assignment
        c1 = ph @ self.expert_s
        self._greedy = g = {
            "c0": ph @ self.dense_s, "c1": c1, "rin": rin,
            "sout_t": np.ascontiguousarray(np.stack([self.inv_bw * mk for mk in (intra, inter)]).transpose(2, 0, 1)) * bpt / ep,  # [dst, 2, src]
            "lat_r": np.stack([(self.lat * mk).max(0) for mk in (intra, inter)]), "lat_s": np.stack([(self.lat * mk).max(1) for mk in (intra, inter)]),
            "kcoef": c1 + self.a2a_passes * rin.max(0),  # seconds per microbatch per assignment added to a rank
            # the transfer one shadow homed on h costs alone, per target rank (the target's tie-break)
            "solo": self.weight_bytes * self.inv_bw + self.lat + self.grad_bytes * self.inv_bw.T + self.lat.T,
            "cls_of": np.where(intra, 0, 1).tolist(), "wl": (self.weight_bytes * self.inv_bw).tolist(),
            "gl": (self.grad_bytes * self.inv_bw.T).tolist(), "lat": self.lat.tolist(),  # gl[h][r]: gradient r -> h
        }
        return g

    @property
    def a2a_passes(self) -> int:
        """Exchanges (dispatch or combine) per microbatch: F and B each dispatch + combine; a
        checkpointed B recomputes F's."""
        return 2 * (3 if self.checkpointing else 2)


def layer_setup(cm: CostModel, topology: Topology, group: Sequence[int], layer: int, microbatches: int,
                grad_bytes_per_param: float = 4.0, weight_bytes_per_param: Optional[float] = None) -> ShadowLayer:
    """The ShadowLayer of MoE block `layer` on EP group `group` (global ranks) for cost model
    `cm`. Weights travel in the training dtype (spec.dtype_bytes per parameter unless given);
    gradients in fp32 (4 bytes, as the simulator's gradient all-reduce) unless given."""
    spec = cm.spec
    if not spec.layers[layer].is_moe:
        raise ConfigError(f"layer={layer} is not a MoE block: shadows are per MoE layer ({spec.moe_layers})")
    g = np.asarray(group, dtype=np.int64)
    rate = cm.rate(topology, g)
    ep = len(g)
    T = spec.tokens_per_microbatch
    T_e = T / ep if cm.ep_splits_tokens else T
    wb = spec.dtype_bytes if weight_bytes_per_param is None else weight_bytes_per_param
    p = spec.layers[layer].expert_params
    return ShadowLayer(
        topology=topology, group=g,
        dense_s=cm.dense_work[layer][:, None] * T_e / rate[None], expert_s=cm.expert_work[layer][:, None] / rate[None],
        dense_work=cm.dense_work[layer].copy(), expert_work=cm.expert_work[layer].copy(), tokens=T_e, rate=rate,
        assign=T * spec.top_k, bytes_per_token=spec.hidden_bytes_per_token, microbatches=int(microbatches),
        checkpointing=bool(spec.activation_checkpointing), a2a=cm.a2a, weight_bytes=float(p * wb), grad_bytes=float(p * grad_bytes_per_param),
        rule_nodes=rule_nodes(ep, rule_local_size(topology)),
    )


# ------------------------------------------------------------------ exact evaluation (the cost model's numbers)


def with_shadows(holders: Sequence[Sequence[int]], shadows: Optional[Mapping[int, Sequence[int]]]) -> list:
    """Every expert's copies: its holders, then its shadows (the order the runtime's rule sees)."""
    if not shadows:
        return [list(h) for h in holders]
    return [list(h) + list(shadows.get(e, ())) for e, h in enumerate(holders)]


def shadowed_expert_map(expert_map: Mapping[int, Sequence[Sequence[int]]], shadows_by_layer: Optional[Mapping[int, Mapping]]) -> dict:
    """A plan's expert_map with each layer's shadows appended as copies: give it to the simulator
    or an Evaluator (Plan(..., expert_map=this)) for the compute and all-to-all with shadows;
    its gradient all-reduce and memory must still be the plan's own (shadows are not in the DP
    all-reduce: they hand their gradients to the home first)."""
    sb = shadows_by_layer or {}
    return {l: with_shadows(m, sb.get(l)) for l, m in expert_map.items()}


def _fractions(load: Any, E: int, ep: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(frac [E] summing to 1, origin share [ep, E] or None) from [E] or [ep, E] counts."""
    x = np.asarray(load, dtype=np.float64)
    if x.ndim == 2:
        if x.shape != (ep, E):
            raise ConfigError(f"load has shape {x.shape}, expected ({E},) or ({ep}, {E}) = (EP ranks, experts): tokens per expert (per source rank)")
        col = x.sum(0)
        share = np.where(col > 0, x / np.where(col > 0, col, 1), 1.0 / ep)
        x = col
    else:
        share = None
    if x.shape != (E,) or (x < 0).any() or not np.isfinite(x).all():
        raise ConfigError(f"load has shape {x.shape} or a negative/non-finite count: give {E} token counts >= 0")
    tot = x.sum()
    return (x / tot if tot > 0 else np.full(E, 1.0 / E)), share


@dataclass
class LayerStepTime:
    comp: np.ndarray  # [3] per microbatch: slowest member's compute per phase (B includes the recomputed F)
    a2a: np.ndarray  # [3] per microbatch: dispatch + combine per phase
    transfer_s: float  # per step: weights home -> shadows + gradients back
    microbatches: int

    @property
    def per_microbatch_s(self) -> float:
        return float(self.comp.sum() + self.a2a.sum())

    @property
    def step_s(self) -> float:
        """The layer's time on its pipeline rank over one step, transfers included."""
        return self.microbatches * self.per_microbatch_s + self.transfer_s


def layer_step_time(setup: ShadowLayer, holders: Sequence[Sequence[int]], load: Any, shadows: Optional[Mapping[int, Sequence[int]]] = None) -> LayerStepTime:
    """The layer's time by the cost model's own rule (nearest-replica split, `exchange_time`):
    with no shadows, comp and a2a are exactly `cost_model.stage_costs`' per-layer terms (and
    the Evaluator's `layer_times`); shadows add copies and the per-step transfers."""
    s = setup
    frac, share = _fractions(load, len(holders), s.ep)
    copies = with_shadows(holders, shadows)
    routed, tok = layer_exchange(copies, frac, s.assign, s.rule_nodes, share)
    # the same operation order as stage_costs: dense_work*T_e/rate + expert_work*routed/rate
    t = s.dense_work[:, None] * s.tokens / s.rate[None] + s.expert_work[:, None] * routed[None, :] / s.rate[None]
    comp = t.max(-1)
    a2a = np.zeros(3)
    if s.ep > 1:
        bpt = s.bytes_per_token
        a2a[0] = a2a[1] = exchange_time(None if tok is None else tok * bpt, routed * bpt, s.group, s.topology, s.a2a)
    if s.checkpointing:
        comp[1] += comp[0]
        a2a[1] += a2a[0]
    return LayerStepTime(comp, a2a, shadow_transfer_s(s, holders, shadows), s.microbatches)


def transfer_matrix(holders: Sequence[Sequence[int]], shadows: Optional[Mapping[int, Sequence[int]]], ep: int) -> np.ndarray:
    """[ep, ep] expert copies home -> shadow per step. The home of e is its first holder (the
    plan's copy that keeps the optimizer state; replicas share it through the replica sync)."""
    m = np.zeros((ep, ep))
    for e, rs in (shadows or {}).items():
        for r in rs:
            m[holders[e][0], r] += 1.0
    return m


def shadow_transfer_s(setup: ShadowLayer, holders: Sequence[Sequence[int]], shadows: Optional[Mapping[int, Sequence[int]]],
                      copies: Optional[np.ndarray] = None) -> float:
    """Per-step seconds of the shadows' weight broadcast (home -> shadows, before the forward)
    and gradient return (shadows -> home, after the backward), each one all-to-all on the EP
    group's links. `copies`: a precomputed `transfer_matrix` (e.g. summed over the layers of a
    pipeline rank, which share the links)."""
    m = transfer_matrix(holders, shadows, setup.ep) if copies is None else copies
    if not m.any():
        return 0.0
    topo, g = setup.topology, setup.group
    return float(topo.all_to_all_time(m * setup.weight_bytes, g) + topo.all_to_all_time(m.T * setup.grad_bytes, g))


# ------------------------------------------------------------------ the greedy decision


@dataclass
class ShadowChoice:
    shadows: Shadows  # expert -> extra EP ranks (empty: no shadow pays)
    saved_s: float  # per step: m * (T({}) - T(S)) by the exact rule (the loop's estimate when exact=False)
    transfer_s: float  # per step: X(S)
    candidates: int  # shadows the greedy sequence proposed before the prefix was cut
    exact: bool

    @property
    def net_s(self) -> float:
        return self.saved_s - self.transfer_s


def _class_masks(setup: ShadowLayer) -> tuple[np.ndarray, np.ndarray]:
    node = setup.topology.node_of[setup.group]
    same = node[:, None] == node[None, :]
    off = ~np.eye(setup.ep, dtype=bool)
    return same & off, ~same


def choose_shadows(load: Any, holders: Sequence[Sequence[int]], setup: ShadowLayer, shadow_slots: int, exact: bool = True,
                   max_candidates: Optional[int] = None, patience: int = PATIENCE) -> ShadowChoice:
    """Shadows for one MoE layer from its load ([E] tokens per expert, or [ep, E] per source
    EP rank; proportions only, rescaled to the layer's assignments per microbatch), the plan's
    holders (expert -> EP ranks), and at most `shadow_slots` shadows per EP rank. The rule and
    the greedy are in the module docstring. Deterministic: ties go to the lowest index.
    `exact`: re-check the chosen set with the cost model's exact rule (else trust the loop).
    `max_candidates`: cap on the greedy sequence's length (default: every slot)."""
    s = setup
    ep, E = s.ep, len(holders)
    if shadow_slots < 0:
        raise ConfigError(f"placer.shadow_slots={shadow_slots} must be >= 0: shadow copies per EP rank per MoE layer (0 turns the fast path off)")
    empty = ShadowChoice({}, 0.0, 0.0, 0, exact)
    if shadow_slots == 0 or ep < 2 or E == 0:
        return empty
    frac, _ = _fractions(load, E, ep)
    m = s.microbatches
    tok_a = frac * s.assign  # assignments per microbatch per expert
    tok = tok_a.tolist()
    copies = [list(h) for h in holders]
    lens = np.fromiter(map(len, copies), dtype=np.int64, count=E)
    ncop = lens.tolist()
    cols = np.fromiter(chain.from_iterable(copies), dtype=np.int64, count=int(lens.sum()))
    rows = np.repeat(np.arange(E), lens)
    forbid = np.zeros((E, ep))  # inf where e already has a copy (no second copy on a rank) or the rank has no free slot
    forbid[rows, cols] = np.inf
    held = np.zeros((ep, E), dtype=bool)
    held[cols, rows] = True
    held_t = held.T.astype(np.float64)  # [E, ep] 1.0 where e has a copy (a contiguous row per expert)
    L = np.bincount(cols, weights=(tok_a / lens)[rows], minlength=ep).astype(np.float64)  # routed assignments per rank (even split)

    g = s.greedy_terms()
    c0, c1, rin, sout_t, lat_r, lat_s, kcoef, solo = (g[k] for k in ("c0", "c1", "rin", "sout_t", "lat_r", "lat_s", "kcoef", "solo"))
    npass = s.a2a_passes
    rin0, rin1, lr0, lr1 = rin[0], rin[1], lat_r[0], lat_r[1]
    inter = bool(rin1.any() or lr1.any())  # the group spans nodes (else one receive stream per rank)
    comp = c0 + c1 * L
    recv = np.maximum(rin0 * L + lr0, rin1 * L + lr1)  # [ep]
    send = np.einsum("dcs,d->cs", sout_t, L) + lat_s  # [2, ep]
    kcoef = c1 + npass * rin.max(0)  # seconds per microbatch per added assignment on a rank
    key = comp + npass * recv
    keym, buf, tmp = key * m, np.empty(ep), np.empty(ep)  # scratch: the loop allocates nothing per step

    send_max = float(send.max())  # the send streams of an even dispatch barely move with L: kept at their start

    def objective() -> float:  # argmax + index: cheaper than ndarray.max at this size
        return float(comp[comp.argmax()] + npass * max(float(recv[recv.argmax()]), send_max))

    base = objective()
    # a floor under any objective the loop can reach: every assignment computed at the fastest
    # ranks' combined rate, no all-to-all; once m*(base - floor) - X cannot beat the best prefix, stop
    floor = float(max(c0.max(), c0.min() + float(np.sum(tok)) / float((1.0 / c1).sum())))
    # per-step transfer streams (seconds): weights home -> shadow and gradients back, by link class
    cls_of, wl, gl, lat = g["cls_of"], g["wl"], g["gl"], g["lat"]
    # per (send|recv, class, rank): seconds of bytes and the largest latency, weights then gradients
    sw, sl = [0.0] * (8 * ep), [0.0] * (8 * ep)
    x_w = x_g = 0.0

    def stream(i: int, t: float, a: float) -> float:
        sw[i] += t
        if a > sl[i]:
            sl[i] = a
        return sw[i] + sl[i]

    free = [int(shadow_slots)] * ep
    on_rank: dict[int, list] = {}
    home = [h[0] for h in copies]
    seq: list[tuple[int, int]] = []
    ends, nets, trans, objs = [0], [0.0], [0.0], [base]  # per greedy step: shadows so far, net, X, objective
    best, since = 0.0, 0
    tol = TOL * m * base
    limit = ep * shadow_slots if max_candidates is None else min(max_candidates, ep * shadow_slots)
    while len(seq) < limit:
        b = int(key.argmax())
        kb = float(key[b])
        picked = None
        on_b = on_rank.get(b)  # experts with a copy on b (looked up once per rank, then kept)
        if on_b is None:
            on_b = on_rank[b] = np.flatnonzero(held[b]).tolist()
        hot = sorted(on_b, key=lambda x: (-tok[x] / ncop[x], x))[:4]  # the hottest copies on b first
        for e in hot:
            if tok[e] <= 0:
                break
            share = tok[e] / (ncop[e] + 1)
            np.multiply(kcoef, share * m, out=buf)  # the rank's step seconds after taking the share, + the transfer
            buf += keym
            buf += solo[home[e]]
            buf += forbid[e]
            r = int(buf.argmin())
            if forbid[e, r] == 0 and key[r] + share * kcoef[r] < kb:
                picked = (e, [r])
                break
        e = hot[0] if hot else -1
        # the spread can only win if even its best case (two copies, b's share per slot
        # tok/(c(c+2))) beats the single shadow found; and only if some rank can take a copy
        if e >= 0 and tok[e] > 0 and (picked is None or (picked[0] != e and tok[e] / (ncop[e] * (ncop[e] + 2))
                                                       > tok[picked[0]] / (ncop[picked[0]] * (ncop[picked[0]] + 1)))):
            # no single shadow of the hottest copy helps: spread it over several ranks at once (an
            # expert hotter than a rank's fair share overloads any one target); the smallest j
            # whose j best targets all stay below b's time (bounded by the prefix maxima of their
            # times and coefficients). Taken over the single shadow of a cooler copy when it
            # takes more off b per slot used.
            e, c = hot[0], ncop[hot[0]]
            score = keym + solo[home[e]]
            score += forbid[e]
            order = np.argsort(score, kind="stable")
            order = order[: int(np.isfinite(score).sum())]
            if len(order):
                js = np.arange(1, len(order) + 1)
                ok = np.flatnonzero(np.maximum.accumulate(key[order]) + tok[e] / (c + js) * np.maximum.accumulate(kcoef[order]) < kb)
                if len(ok):
                    j = int(ok[0]) + 1

                    def per_slot(x, n):  # b's assignments removed per shadow
                        return tok[x] * (1.0 / ncop[x] - 1.0 / (ncop[x] + n)) / n

                    if picked is None or per_slot(e, j) > per_slot(picked[0], 1):
                        picked = (e, order[:j].tolist())
        if picked is None:
            break
        e, rs = picked
        h = home[e]
        old, ncop[e] = tok[e] / ncop[e], ncop[e] + len(rs)
        new = tok[e] / ncop[e]
        affected = copies[e] + rs  # only the copies' ranks change
        if len(affected) <= SCALAR_UPDATE:  # a few ranks: element updates (same arithmetic as the vector form below)
            for j in copies[e]:
                L[j] += new - old
            for j in rs:
                L[j] += new
            for j in affected:
                lj = L[j]
                cj = c1[j] * lj + c0[j]
                rj = rin0[j] * lj + lr0[j]
                if inter:
                    rj = max(rj, rin1[j] * lj + lr1[j])
                comp[j], recv[j] = cj, rj
                key[j] = rj * npass + cj
                keym[j] = key[j] * m
        else:
            L += held_t[e] * (new - old)
            L[rs] += new
            np.multiply(c1, L, out=comp)
            comp += c0
            np.multiply(rin0, L, out=recv)
            recv += lr0
            if inter:
                np.multiply(rin1, L, out=tmp)
                tmp += lr1
                np.maximum(recv, tmp, out=recv)
            np.multiply(recv, npass, out=key)
            key += comp
            np.multiply(key, m, out=keym)
        copies[e].extend(rs)
        for r in rs:
            if r in on_rank:
                on_rank[r].append(e)
        forbid[e, rs] = np.inf
        held[rs, e] = True
        held_t[e, rs] = 1.0
        for r in rs:
            free[r] -= 1
            if free[r] == 0:
                forbid[:, r] = np.inf
            o = cls_of[h][r] * ep
            w, a, gb, ga = wl[h][r], lat[h][r], gl[h][r], lat[r][h]
            x_w = max(x_w, stream(o + h, w, a), stream(2 * ep + o + r, w, a))
            x_g = max(x_g, stream(4 * ep + o + r, gb, ga), stream(6 * ep + o + h, gb, ga))
            seq.append((e, r))
        ob = objective()
        ends.append(len(seq))
        objs.append(ob)
        trans.append(x_w + x_g)
        nets.append(m * (base - ob) - (x_w + x_g))
        if nets[-1] > best + tol:  # a real gain (not a rounding-level one) restarts the patience
            since = 0
        else:
            since += 1
        best = max(best, nets[-1])
        if since >= patience or m * (base - floor) - (x_w + x_g) <= best:
            break
    i = int(np.argmax(nets))  # first of the best prefixes (ties: fewer shadows)
    if i == 0 or nets[i] <= 0:
        return ShadowChoice({}, 0.0, 0.0, len(seq), exact)
    chosen: dict[int, list] = {}
    for e, r in seq[:ends[i]]:
        chosen.setdefault(e, []).append(r)
    out = {e: tuple(rs) for e, rs in sorted(chosen.items())}
    if not exact:
        return ShadowChoice(out, m * (base - objs[i]), trans[i], len(seq), False)
    t0 = layer_step_time(s, holders, load)
    t1 = layer_step_time(s, holders, load, out)
    saved = t0.step_s - (t1.step_s - t1.transfer_s)
    if saved - t1.transfer_s <= 0:
        return ShadowChoice({}, 0.0, 0.0, len(seq), True)
    return ShadowChoice(out, saved, t1.transfer_s, len(seq), True)
