"""Time of each piece of work on each device, for the simulator and the placers.

Work is counted in FLOP-equivalents per token, per phase: F (forward), B (backward to the
inputs) and W (backward to the weights; zero-bubble schedules run it separately). A device
runs work at `flops_per_s * efficiency`. The figures come from the model spec (analytic) or
from a measured profile (calibrated; format in `load_profile` and docs/SIMULATOR.md), which
is turned into FLOP-equivalents of the device it was measured on, so both paths share one
code path and scale to other devices by relative throughput.

MoE layers: each EP rank computes its share of the microbatch's tokens for the dense part
(`ep_splits_tokens`: tokens are spread over the EP group, as with all-to-all dispatch) and the
tokens routed to the experts it holds; dispatch and combine all-to-alls lock-step the group,
so a layer lasts as long as its slowest member plus the two all-to-alls.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from moepipe.config import ConfigError
from moepipe.placement.model_spec import ModelSpec
from moepipe.placement.plan import Plan, rank_grid
from moepipe.placement import tensor_parallel_cost as tpc
from moepipe.placement.topology import Topology

PHASES = ("F", "B", "W")
_PROFILE_KEYS = ("fwd_s", "bwd_input_s", "bwd_weight_s")


# ------------------------------------------------------------------ profile


@dataclass
class Profile:
    """Measured seconds on one device. Arrays are [3] = (F, B, W); None where not measured."""

    device_flops_per_s: float  # tflops * 1e12 * speed of the measuring device
    tokens_per_microbatch: float
    layers: dict[int, Optional[np.ndarray]]  # non-expert part of block i, one microbatch
    embedding: Optional[np.ndarray]
    head: Optional[np.ndarray]
    expert_per_token: dict[int, np.ndarray]  # layer (or -1 for all layers) -> seconds per routed token through one expert


def _phases(path: str, d: Mapping[str, Any], split: np.ndarray) -> np.ndarray:
    """(F, B, W) seconds from {fwd_s, bwd_input_s, bwd_weight_s} or {fwd_s, bwd_s} (split by `split`)."""
    try:
        f = float(d["fwd_s"])
        if "bwd_input_s" in d:
            b, w = float(d["bwd_input_s"]), float(d.get("bwd_weight_s", 0.0))
        else:
            tot = float(d["bwd_s"])
            frac = split[1] / max(split[1] + split[2], 1e-30)
            b, w = tot * frac, tot * (1 - frac)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path} needs fwd_s and bwd_input_s/bwd_weight_s (or bwd_s) in seconds: fix the profile entry") from None
    out = np.array([f, b, w])
    if not np.all(np.isfinite(out)) or (out < 0).any():
        raise ConfigError(f"{path}={dict(d)} has a negative or non-finite time: times are seconds >= 0")
    return out


def load_profile(src: str | Path | Mapping[str, Any], split: Optional[np.ndarray] = None) -> Profile:
    """Parse the profile JSON (a path, JSON text or a dict). See docs/SIMULATOR.md for the format.

    `split` is the default B:W ratio (index 1 and 2 of a [3] array) for entries giving only bwd_s.
    """
    if isinstance(src, Mapping):
        d = dict(src)
    else:
        text = Path(src).read_text() if Path(str(src)).exists() else str(src)
        d = json.loads(text)
    if int(d.get("version", 1)) != 1:
        raise ConfigError(f"profile version={d.get('version')} is not supported: write version 1")
    split = np.array([1.0, 1.0, 1.0]) if split is None else split
    dev = d.get("device", {})
    try:
        rate = float(dev["tflops"]) * 1e12 * float(dev.get("speed", 1.0))
        tokens = float(d["tokens_per_microbatch"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("profile needs device.tflops and tokens_per_microbatch: add them to the profile JSON") from None
    if rate <= 0 or tokens <= 0:
        raise ConfigError("profile device.tflops and tokens_per_microbatch must be > 0: fix the profile JSON")
    layers = {int(k): _phases(f"profile.layers[{k}]", v, split) for k, v in d.get("layers", {}).items()}
    emb = _phases("profile.embedding", d["embedding"], split) if "embedding" in d else None
    head = _phases("profile.head", d["head"], split) if "head" in d else None
    ex = d.get("expert_per_token_s", {})
    experts: dict[int, np.ndarray] = {}
    if "fwd_s" in ex:
        experts[-1] = _phases("profile.expert_per_token_s", ex, split)
    else:
        experts = {int(k): _phases(f"profile.expert_per_token_s[{k}]", v, split) for k, v in ex.items()}
    return Profile(rate, tokens, layers, emb, head, experts)


# ------------------------------------------------------------------ cost model


class CostModel:
    """Per-token work of every block, per phase, and its time on a device.

    Attributes (FLOP-equivalents per token, columns F, B, W):
      dense_work [n_layers, 3]: non-expert part of each block
      expert_work [n_layers, 3]: one routed token through one expert (0 for dense blocks)
      embed_work [3], head_work [3]
    """

    def __init__(self, spec: ModelSpec, efficiency: float = 0.5, profile: Optional[Profile | Mapping | str] = None, ep_splits_tokens: bool = True,
                 a2a: str = "flat", sequence_parallel: bool = False):
        if not 0 < efficiency <= 1:
            raise ConfigError(f"cost_model.efficiency={efficiency} must be in (0, 1]: the fraction of sustained FLOP/s a layer reaches")
        if a2a not in A2A_MODES:
            raise ConfigError(f"parallel.a2a={a2a!r} is not one of {list(A2A_MODES)}: pick one")
        self.spec, self.efficiency, self.ep_splits_tokens = spec, efficiency, ep_splits_tokens
        self.a2a = a2a  # parallel.a2a: how the expert all-to-all is modelled (flat | hierarchical)
        # under tensor parallelism (a tp_groups topology): norms' activations split over the TP group too
        self.sequence_parallel = bool(sequence_parallel)
        L = spec.n_layers
        self.dense_work = np.zeros((L, 3))
        self.expert_work = np.zeros((L, 3))
        for i, l in enumerate(spec.layers):
            # weight matmuls: B and W each cost one forward; attention core has no weights, its backward (2x) is all B
            self.dense_work[i] = (l.matmul_flops + l.attn_core_flops, l.matmul_flops + 2 * l.attn_core_flops, l.matmul_flops)
            self.expert_work[i] = (l.expert_flops,) * 3
        self.embed_work = np.zeros(3)  # a lookup and a scatter-add: negligible FLOPs
        self.head_work = np.full(3, spec.head_flops)
        self.profile = None
        if profile is not None:
            self.profile = profile if isinstance(profile, Profile) else load_profile(profile)
            self._calibrate(self.profile)

    def _calibrate(self, p: Profile) -> None:
        # measured seconds -> FLOP-equivalents per token of the measuring device at our efficiency
        scale = p.device_flops_per_s * self.efficiency
        for i, t in p.layers.items():
            if 0 <= i < self.spec.n_layers and t is not None:
                self.dense_work[i] = t * scale / p.tokens_per_microbatch
        if p.embedding is not None:
            self.embed_work = p.embedding * scale / p.tokens_per_microbatch
        if p.head is not None:
            self.head_work = p.head * scale / p.tokens_per_microbatch
        for i, l in enumerate(self.spec.layers):
            t = p.expert_per_token.get(i, p.expert_per_token.get(-1))
            if l.is_moe and t is not None:
                self.expert_work[i] = t * scale

    # -------------------------------------------------------------- scalar helpers
    def rate(self, topology: Topology, ranks: Any = None) -> np.ndarray:
        """Effective FLOP/s of devices: sustained throughput x speed x efficiency."""
        return topology.flops_per_s(ranks) * self.efficiency

    def layer_time(self, layer: int, phase: str, tokens: float, flops_per_s: float, routed_tokens: float = 0.0) -> float:
        """Seconds for `tokens` through block `layer`'s non-expert part plus `routed_tokens`
        token-expert assignments handled by this device's experts (phase F, B or W)."""
        ph = PHASES.index(phase)
        return float((self.dense_work[layer, ph] * tokens + self.expert_work[layer, ph] * routed_tokens) / (flops_per_s * self.efficiency))

    def moe_layer_time(
        self, layer: int, phase: str, tokens: float, routed_tokens_per_rank: Any, group: Any, topology: Topology, bytes_per_token: Optional[float] = None
    ) -> float:
        """One MoE block on an EP group: slowest member's compute + dispatch + combine all-to-all."""
        ph = PHASES.index(phase)
        routed = np.asarray(routed_tokens_per_rank, dtype=np.float64)
        rate = self.rate(topology, group)
        comp = (self.dense_work[layer, ph] * tokens + self.expert_work[layer, ph] * routed) / rate
        if ph == 2:
            return float(comp.max())
        bpt = self.spec.hidden_bytes_per_token if bytes_per_token is None else bytes_per_token
        return float(comp.max() + exchange_time(None, routed * bpt, group, topology, self.a2a))

    def work_per_microbatch(self) -> np.ndarray:
        """[3] FLOP-equivalents of one microbatch through the whole model (one pipeline replica)."""
        s = self.spec
        routed = s.tokens_per_microbatch * s.top_k
        per = self.dense_work.sum(0) * s.tokens_per_microbatch + self.expert_work.sum(0) * routed
        return per + (self.embed_work + self.head_work) * s.tokens_per_microbatch


# ------------------------------------------------------------------ per-stage costs for the simulator


@dataclass
class StageCosts:
    """Seconds per action of each stage (one microbatch), columns (F, B, W)."""

    comp: np.ndarray  # [n_stages, 3] slowest EP member's compute (max over dp replicas)
    a2a: np.ndarray  # [n_stages, 3] dispatch + combine all-to-all, blocking
    send: np.ndarray  # [n_stages] seconds to move stage s's output to stage s+1 (0 on the same rank)
    act_bytes: np.ndarray  # [n_stages, dp, ep] activation bytes kept per in-flight microbatch
    ep_busy: np.ndarray  # [n_stages, 3, dp, ep] compute seconds of each member (for idle accounting)
    a2a_bytes_intra: float  # per microbatch, forward + backward, all replicas
    a2a_bytes_inter: float
    p2p_bytes: float  # per microbatch, forward + backward, all replicas
    grad_sync_s: float  # data-parallel gradient all-reduce after the pipeline drains
    work: np.ndarray  # [3] FLOP-equivalents per microbatch per replica
    rates: np.ndarray  # [pp, dp, ep] effective FLOP/s of every device
    a2a_msgs_intra: int = 0  # all-to-all messages per microbatch, forward + backward, all replicas
    a2a_msgs_inter: int = 0
    # [n_stages, dp, ep] bytes a microbatch keeps from its I to its W under lean W
    # (parallel/weight_grad.py: each Linear's input and output gradient); None: not derived
    lean_w_bytes: Any = None


def routed_tokens(plan: Plan, spec: ModelSpec, routing: Any = None, fractions: bool = False) -> np.ndarray:
    """[n_moe_layers, ep] token-expert assignments per microbatch landing on each EP rank, if
    replicas of an expert shared its tokens equally (the estimate placers search with; the
    runtime's nearest-replica rule is `layer_exchanges`). `fractions`: the [n_moe, E] shares.

    `routing` gives per-expert counts per MoE layer ([n_moe, E] array, or {layer: [E]}); only
    proportions matter: each layer is rescaled to tokens_per_microbatch * top_k. None: uniform.
    """
    moe = spec.moe_layers
    E = spec.num_experts
    if not moe:
        return np.zeros((0, plan.ep))
    if routing is None:
        counts = np.ones((len(moe), E))
    elif isinstance(routing, Mapping):
        counts = np.array([np.asarray(routing[l], dtype=np.float64) for l in moe])
    else:
        counts = np.asarray(routing, dtype=np.float64)
    if counts.shape != (len(moe), E):
        raise ConfigError(f"routing has shape {counts.shape}, expected ({len(moe)}, {E}) = (MoE layers, experts): give one count per expert per MoE layer")
    if (counts < 0).any() or not np.isfinite(counts).all():
        raise ConfigError("routing has a negative or non-finite count: token counts are >= 0")
    tot = counts.sum(1, keepdims=True)
    frac = np.where(tot > 0, counts / np.where(tot > 0, tot, 1), 1.0 / E)
    if fractions:
        return frac
    share = np.zeros((len(moe), E, plan.ep))
    for li, l in enumerate(moe):
        for e, ranks in enumerate(plan.expert_map[l]):
            share[li, e, ranks] = 1.0 / len(ranks)
    return np.einsum("le,ler->lr", frac, share) * spec.tokens_per_microbatch * spec.top_k


def rule_local_size(topology: Topology) -> int:
    """Ranks per node as the runtime's replica rule sees them (topology.devices_per_node): the
    size of the first device's node."""
    return max(1, int((topology.node_of == topology.node_of[0]).sum()))


def layer_exchanges(cm: "CostModel", plan: Plan, topology: Topology, routing: Any = None, origins: Any = None
                    ) -> tuple[np.ndarray, list[Optional[np.ndarray]]]:
    """Every MoE layer's dispatch under the nearest-replica rule: (routed [n_moe, ep], tokens per
    layer: [ep, ep] source -> destination assignments, or None for the even pattern)."""
    spec = cm.spec
    moe = spec.moe_layers
    if not moe:
        return np.zeros((0, plan.ep)), []
    frac = routed_tokens(plan, spec, routing, fractions=True)  # [n_moe, E]
    share = origin_shares(origins, moe, plan.ep, spec.num_experts)
    nodes = rule_nodes(plan.ep, rule_local_size(topology))
    assign = spec.tokens_per_microbatch * spec.top_k
    routed, tokens = np.zeros((len(moe), plan.ep)), []
    for li, l in enumerate(moe):
        routed[li], t = layer_exchange(plan.expert_map[l], frac[li], assign, nodes, None if share is None else share[li])
        tokens.append(t)
    return routed, tokens


def stage_costs(
    cm: CostModel, plan: Plan, topology: Topology, routing: Any = None, free_comm: bool = False, grad_bytes: int = 4, origins: Any = None
) -> StageCosts:
    spec = cm.spec
    if topology.n_devices < plan.world_size:
        raise ConfigError(f"parallel.pp*ep*dp={plan.world_size} > topology devices={topology.n_devices}: pick a larger topology")
    grid = rank_grid(plan.pp, plan.ep, plan.dp)  # [pp, dp, ep]
    rates = cm.rate(topology, grid)
    S = plan.n_stages
    T = spec.tokens_per_microbatch
    T_e = T / plan.ep if cm.ep_splits_tokens else T
    bpt = spec.hidden_bytes_per_token
    ckpt = spec.activation_checkpointing
    routed, tokens = layer_exchanges(cm, plan, topology, routing, origins)  # [n_moe, ep], per layer [ep, ep] or None
    moe_row = {l: i for i, l in enumerate(spec.moe_layers)}
    msgs_i = msgs_x = 0
    # tensor parallelism (topology.tp > 1: a device is a TP group): per-block collectives on each
    # group's ring [pp, 3, dp, ep] (zeros for tp = 1), activations and experts' share per GPU
    tp, sp = topology.tp, cm.sequence_parallel
    tp_t = np.zeros((plan.pp, 3) + grid.shape[1:]) if free_comm else np.moveaxis(tpc.tp_block_seconds_on(spec, T_e, topology, grid), 0, 1)
    ex_share = tpc.expert_share_per_gpu(tp)

    comp = np.zeros((S, 3))
    a2a = np.zeros((S, 3))
    act = np.zeros((S, plan.dp, plan.ep))
    lean = np.zeros((S, plan.dp, plan.ep))  # bytes kept from I to W under lean W (tp = 1 shapes)
    busy = np.zeros((S, 3, plan.dp, plan.ep))
    intra = inter = 0.0
    for s, (a, b) in enumerate(plan.stage_layers):
        p = plan.stage_to_pp_rank[s]
        r = rates[p]  # [dp, ep]
        comp_s = np.zeros((3, plan.dp))  # sum over layers of max over ep
        a2a_s = np.zeros(plan.dp)
        extra = np.zeros(3)
        if s == 0:
            extra += cm.embed_work
        if s == S - 1:
            extra += cm.head_work
            act[s] += tpc.head_act_elems_per_gpu(spec, tp, sp) * T_e * spec.dtype_bytes
            lean[s] += spec.head_lean_w_elems * T_e * spec.dtype_bytes
        if extra.any():
            t = extra[:, None, None] * T_e / r[None]
            comp_s += t.max(-1)
            busy[s] += t
        for l in range(a, b):
            lay = spec.layers[l]
            t = cm.dense_work[l][:, None, None] * T_e / r[None]  # [3, dp, ep]
            t_c = t + tp_t[p]  # the block's TP collectives block its compute lane (no overlap)
            act[s] += tpc.act_elems_per_gpu(lay, spec, tp, sp) * T_e * spec.dtype_bytes
            lean[s] += lay.lean_w_elems * T_e * spec.dtype_bytes
            if lay.is_moe:
                routed_l = routed[moe_row[l]]  # [ep]
                t_e = cm.expert_work[l][:, None, None] * routed_l[None, None, :] / r[None]
                t, t_c = t + t_e, t_c + t_e
                act[s] += lay.expert_act_elems * routed_l[None, :] * ex_share * spec.dtype_bytes
                lean[s] += lay.expert_lean_w_elems * routed_l[None, :] * spec.dtype_bytes
                if not free_comm and plan.ep > 1:
                    tok = tokens[moe_row[l]]
                    tok_b = None if tok is None else tok * bpt
                    passes = 2 * (3 if ckpt else 2)  # dispatch + combine; fwd and bwd (and the recomputed fwd)
                    for d in range(plan.dp):
                        a2a_s[d] += exchange_time(tok_b, routed_l * bpt, grid[p, d], topology, cm.a2a)
                        i_b, x_b, i_m, x_m = exchange_traffic(tok_b, routed_l * bpt, grid[p, d], topology, cm.a2a)
                        intra += passes * i_b
                        inter += passes * x_b
                        msgs_i += passes * i_m
                        msgs_x += passes * x_m
            comp_s += t_c.max(-1)
            busy[s] += t
        comp[s] = comp_s.max(-1)
        a2a[s, 0] = a2a[s, 1] = a2a_s.max()
        if ckpt:  # backward first recomputes the forward, dispatch included
            comp[s, 1] += comp[s, 0]
            a2a[s, 1] += a2a[s, 0]
            busy[s, 1] += busy[s, 0]

    send = np.zeros(S)
    p2p_bytes = 0.0
    for s in range(S - 1):
        p, q = plan.stage_to_pp_rank[s], plan.stage_to_pp_rank[s + 1]
        if p != q:
            p2p_bytes += 2 * T_e * bpt * plan.ep * plan.dp  # activation forward, its gradient backward
            if not free_comm:
                send[s] = float(np.max(topology.p2p_time(T_e * bpt, grid[p], grid[q])))

    grad = 0.0 if free_comm else _grad_sync(cm, plan, topology, grid, grad_bytes)
    return StageCosts(comp, a2a, send, act, busy, intra, inter, p2p_bytes, grad, cm.work_per_microbatch(), rates, msgs_i, msgs_x, lean)


def _grad_sync(cm: CostModel, plan: Plan, topology: Topology, grid: np.ndarray, grad_bytes: int) -> float:
    """Ring all-reduce of gradients per pipeline rank: dense parameters over every replica of
    them (ep x dp when EP splits tokens, else dp), each EP rank's experts over dp."""
    spec = cm.spec
    worst = 0.0
    for p in range(plan.pp):
        stages = plan.stages_of_rank(p)
        layers = [l for s in stages for l in range(*plan.stage_layers[s])]
        dense = sum(spec.layers[l].params for l in layers)
        dense += spec.embed_params * (0 in stages) + spec.head_params * (plan.n_stages - 1 in stages)
        groups = [grid[p].ravel()] if cm.ep_splits_tokens else [grid[p, :, e] for e in range(plan.ep)]
        t = max(topology.all_reduce_time(dense * grad_bytes, g) for g in groups)
        t_exp = t_tp = 0.0
        if plan.dp > 1 or topology.tp > 1:
            n_exp = np.zeros(plan.ep)  # expert parameters each EP rank holds (replicas included)
            for l in layers:
                if spec.layers[l].is_moe:
                    held = np.fromiter(chain.from_iterable(plan.expert_map[l]), dtype=np.int64)
                    n_exp += np.bincount(held, minlength=plan.ep) * spec.layers[l].expert_params
            if plan.dp > 1:  # runs after the dense all-reduce on the same links
                t_exp = max(topology.all_reduce_time(float(n_exp[e]) * grad_bytes, grid[p, :, e]) for e in range(plan.ep))
            if topology.tp > 1:  # weights every GPU of a TP group holds whole: over the group's ring (tensor_parallel_cost)
                rep = sum(tpc.replicated_params(spec.layers[l], spec) for l in layers) + spec.d_model * (plan.n_stages - 1 in stages)
                t_tp = tpc.tp_grad_sync_time((n_exp[None, :] + rep) * grad_bytes * np.ones((plan.dp, 1)), topology, grid[p])
        worst = max(worst, t + t_exp + t_tp)
    return worst


# ------------------------------------------------------------------ nearest-replica routing
#
# One rule, shared by the runtime dispatcher (integer token counts, torch tensors on the
# device) and the cost model (expected counts, numpy floats): a source EP rank sends its tokens
# for expert e to e's copy on its own rank; else to e's copies in its own node; else to any
# copy. Within a tier the pooled tokens water-fill the copies' loads (the tokens each copy
# already got from the tiers before, so a lightly used copy takes more), and sources are
# matched to copies by the overlap of their cumulative ranges (source order, copy order), which
# is exact in integers and identical on every rank given the same counts.


class _NumpyOps:
    @staticmethod
    def sort(x):  # stable, along the last axis
        idx = np.argsort(x, axis=-1, kind="stable")
        return np.take_along_axis(x, idx, -1), idx

    take = staticmethod(lambda x, idx: np.take_along_axis(x, idx, -1))
    where = staticmethod(np.where)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)

    @staticmethod
    def unsort(x, idx):
        out = np.empty_like(x)
        np.put_along_axis(out, idx, x, -1)
        return out

    @staticmethod
    def arange(n, like):
        return np.arange(1, n + 1, dtype=like.dtype)

    @staticmethod
    def integer(x):
        return np.issubdtype(x.dtype, np.integer)


class _TorchOps:
    def __init__(self):
        import torch  # only when the runtime hands in tensors: the cost model stays numpy-only

        self.torch = torch

    def sort(self, x):
        out = self.torch.sort(x, dim=-1, stable=True)
        return out.values, out.indices

    def take(self, x, idx):
        return self.torch.take_along_dim(x, idx, -1)

    def where(self, c, a, b):
        return self.torch.where(c, a, b)

    def maximum(self, a, b):
        return self.torch.clamp(a, min=b) if not isinstance(b, self.torch.Tensor) else self.torch.maximum(a, b)

    def minimum(self, a, b):
        return self.torch.minimum(a, b)

    def unsort(self, x, idx):
        return self.torch.empty_like(x).scatter_(-1, idx, x)

    def arange(self, n, like):
        return self.torch.arange(1, n + 1, dtype=like.dtype, device=like.device)

    @staticmethod
    def integer(x):
        return not x.is_floating_point()


_OPS: dict = {}


def _ops_for(x):
    kind = "np" if isinstance(x, np.ndarray) else "torch"
    if kind not in _OPS:
        _OPS[kind] = _NumpyOps() if kind == "np" else _TorchOps()
    return _OPS[kind]


@dataclass
class CopyTable:
    """Where each expert's copies are, seen from every source EP rank (static per plan layer).
    Arrays are numpy; `to(convert)` maps them (the runtime makes device tensors once)."""

    slot: Any  # [E, W] EP rank of e's k-th copy (holders order), padded with the first copy
    valid: Any  # [E, W] bool: a real copy
    own: Any  # [ep, E, W] bool: copy k of e is on source rank s
    near: Any  # [ep, E, W] bool: copy k of e is on source s's node (own rank included)
    copy_node: Any  # [E, W] node of copy k (-1 for padding)
    node_of: Any  # [ep] node of each EP rank
    nodes: tuple  # distinct nodes, ascending

    def to(self, convert) -> "CopyTable":
        return CopyTable(*(convert(getattr(self, f)) for f in ("slot", "valid", "own", "near", "copy_node", "node_of")), self.nodes)


def rule_nodes(ep: int, local_size: int) -> np.ndarray:
    """The EP rank -> node map the replica rule uses: consecutive EP ranks share a node,
    `local_size` (topology.devices_per_node) to a node. EP groups are consecutive global ranks
    (rank = ep_rank + ep*(...)), so whenever ep divides, or is a multiple of, the node size this
    is every group's real layout; otherwise the rule (not the results) is merely suboptimal."""
    if int(local_size) < 1:
        raise ConfigError(f"topology.devices_per_node={local_size} must be >= 1: give the ranks per node")
    return np.arange(int(ep)) // int(local_size)


def _distinct_in_range(holders: Any, lens: np.ndarray, ep: int) -> bool:
    """Every holder list names distinct integer EP ranks in [0, ep) (lens: their lengths)."""
    flat = list(chain.from_iterable(holders))
    if not all(issubclass(t, (int, np.integer)) for t in set(map(type, flat))):
        return all(len(set(h)) == len(h) and min(h) >= 0 and max(h) < ep for h in holders)  # the checks on other numbers
    r = np.array(flat, dtype=np.int64)
    if r.min() < 0 or r.max() >= ep:
        return False
    key = np.sort(np.repeat(np.arange(len(lens)), lens) * ep + r)
    return not (key[1:] == key[:-1]).any()


def copy_table(holders: Any, node_of: Any) -> CopyTable:
    """The static table of `split_over_copies` for one layer: holders[e] lists e's EP ranks."""
    node_of = np.asarray(node_of, dtype=np.int64)
    ep, E = len(node_of), len(holders)
    lens = np.fromiter(map(len, holders), dtype=np.int64, count=E)
    if E == 0 or lens.min() == 0 or not _distinct_in_range(holders, lens, ep):
        raise ConfigError(f"expert holders={list(map(list, holders))} must list distinct EP ranks in [0, {ep}) for every expert: fix the plan's expert_map")
    W = int(lens.max())
    valid = np.arange(W)[None, :] < lens[:, None]
    slot = np.repeat(np.array([h[0] for h in holders], dtype=np.int64)[:, None], W, 1)  # padded with the first copy
    slot[valid] = np.fromiter(chain.from_iterable(holders), dtype=np.int64, count=int(lens.sum()))
    copy_node = np.where(valid, node_of[slot], -1)
    own = valid[None] & (slot[None] == np.arange(ep)[:, None, None])
    near = valid[None] & (copy_node[None] == node_of[:, None, None])
    return CopyTable(slot, valid, own, near, copy_node, node_of, tuple(int(n) for n in np.unique(node_of)))


def _waterfill(ops, load, mask, pool, integer: bool):
    """[E, W] extra tokens per copy: `pool[e]` tokens poured on the masked copies of e, lowest
    load first, up to a common level. Integers: the level's remainder goes one token each to the
    lowest-loaded copies (ties: holders order)."""
    W = load.shape[-1]
    big = load.sum() + pool.sum() + 1  # above any level: unmasked copies sort last
    ls, order = ops.sort(ops.where(mask, load, big + 0 * load))
    ms = ops.take(mask, order)
    lz = ops.where(ms, ls, 0 * ls)
    cum = lz.cumsum(-1)
    j = ops.arange(W, lz)
    active = ms & (lz * j < pool[:, None] + cum)  # a prefix: the copies below the final level
    k = active.sum(-1)
    kc = ops.maximum(k, 1)
    num = pool + ops.take(cum, (kc - 1)[:, None])[:, 0]
    if integer:
        q = num // kc
        r = num - q * kc
        xs = q[:, None] - lz + ((j - 1) < r[:, None])
    else:
        xs = (num / kc)[:, None] - lz
    return ops.unsort(ops.where(active, xs, 0 * xs), order)


def _overlap(ops, c, x):
    """[ep, E, W] tokens from source s to copy k: the overlap of s's range in the cumulative
    source counts c [ep, E] with k's range in the cumulative copy intake x [E, W]."""
    c_hi, x_hi = c.cumsum(0), x.cumsum(-1)
    lo = ops.maximum((c_hi - c)[:, :, None], (x_hi - x)[None])
    return ops.maximum(ops.minimum(c_hi[:, :, None], x_hi[None]) - lo, 0)


def split_over_copies(counts: Any, table: CopyTable) -> Any:
    """[ep, E, W] tokens source s sends to expert e's k-th copy under the nearest-replica rule,
    from counts [ep, E] (tokens each source routes to each expert). Integer counts (the
    runtime, torch tensors on any device, no host read) give integer splits; float counts (the
    cost model, numpy) give the same rule on expected counts. Every row sums to its count."""
    ops = _ops_for(counts)
    integer = ops.integer(counts)
    if isinstance(counts, np.ndarray) and len(table.nodes) > 1:  # the cost model's path (the runtime's tables are tensors: no host read)
        L = _node_block(table)
        if L:
            return _split_node_blocks(counts, table, L, integer)
    own, near = table.own, table.near
    has_own, has_near = own.any(-1), near.any(-1)
    out = counts[..., None] * own
    load = out.sum(0)
    c1 = counts * (has_near & ~has_own)  # no copy here, one in this node
    for n in table.nodes:
        c = c1 * (table.node_of == n)[:, None]
        x = _waterfill(ops, load, table.copy_node == n, c.sum(0), integer)
        out = out + _overlap(ops, c, x)
        load = load + x
    c2 = counts * ~has_near  # no copy in this node: any copy, by load
    out = out + _overlap(ops, c2, _waterfill(ops, load, table.valid, c2.sum(0), integer))
    return out


def _node_block(table: CopyTable) -> int:
    """L when the table's nodes are consecutive blocks of L EP ranks (the last may be short),
    as `rule_nodes` makes them; else 0."""
    node_of = np.asarray(table.node_of)
    L = int((node_of == node_of[0]).sum())
    return L if np.array_equal(node_of, np.arange(len(node_of)) // L) else 0


def _split_node_blocks(counts: np.ndarray, table: CopyTable, L: int, integer: bool) -> np.ndarray:
    """`split_over_copies` for numpy counts with nodes in blocks of L ranks: the in-node tier of
    every node at once ([node, rank in node, expert, copy]) instead of one pass per node. Each
    node's sources and copies are disjoint from the others', and the per-node pass only adds
    zeros outside its node, so the result is the same, bit for bit (tests/test_exchange_fast.py)."""
    ep, E = counts.shape
    G = len(table.nodes)
    own, near = table.own, table.near
    has_own, has_near = own.any(-1), near.any(-1)
    out = counts[..., None] * own
    load = out.sum(0)  # [E, W]
    c1 = counts * (has_near & ~has_own)
    cg = np.concatenate([c1, np.zeros((G * L - ep, E), dtype=c1.dtype)]).reshape(G, L, E)
    W = load.shape[-1]
    mask = table.copy_node[None] == np.arange(G)[:, None, None]  # [G, E, W]
    x = _waterfill(_NumpyOps, np.broadcast_to(load, (G, E, W)).reshape(G * E, W), mask.reshape(G * E, W),
                   cg.sum(1).reshape(G * E), integer).reshape(G, E, W)
    c_hi, x_hi = cg.cumsum(1), x.cumsum(-1)
    lo = np.maximum((c_hi - cg)[..., None], (x_hi - x)[:, None])
    tier1 = np.maximum(np.minimum(c_hi[..., None], x_hi[:, None]) - lo, 0).reshape(G * L, E, W)[:ep]
    out = out + tier1
    load = load + x.sum(0)
    c2 = counts * ~has_near  # no copy in this node: any copy, by load
    return out + _overlap(_NumpyOps, c2, _waterfill(_NumpyOps, load, table.valid, c2.sum(0), integer))


# ------------------------------------------------------------------ token origins and the exchange

A2A_MODES = ("flat", "hierarchical")


def origin_shares(origins: Any, moe_layers: Any, ep: int, num_experts: int) -> Optional[np.ndarray]:
    """[n_moe, ep, E]: the share of expert e's tokens that start on EP rank s (columns sum to 1),
    from origin counts ([n_moe, ep, E] or {layer: [ep, E]}, proportions only). None: tokens
    start evenly spread (1/ep each), as without origin statistics."""
    if origins is None:
        return None
    moe = list(moe_layers)
    o = np.array([np.asarray(origins[l], dtype=np.float64) for l in moe]) if isinstance(origins, Mapping) else np.asarray(origins, dtype=np.float64)
    if o.shape != (len(moe), ep, num_experts):
        raise ConfigError(f"origins has shape {o.shape}, expected ({len(moe)}, {ep}, {num_experts}) = (MoE layers, EP ranks, experts): "
                          "give tokens per source EP rank per expert for every MoE layer")
    if (o < 0).any() or not np.isfinite(o).all():
        raise ConfigError("origins has a negative or non-finite count: token counts are >= 0")
    tot = o.sum(1, keepdims=True)
    return np.where(tot > 0, o / np.where(tot > 0, tot, 1), 1.0 / ep)


def layer_exchange(holders: Any, frac: np.ndarray, assign: float, node_of: np.ndarray, share: Optional[np.ndarray] = None
                   ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """One MoE layer's dispatch: (routed [ep] assignments each EP rank's experts receive, tokens
    [ep, ep] source -> destination, or None when every expert has one copy and tokens start
    evenly spread: then the exchange is `Topology.dispatch_time`'s pattern, kept for exact
    agreement with earlier results). `frac` [E]: the layer's share per expert; `assign`:
    assignments per microbatch; `share` [ep, E]: origin shares (None = even);
    `node_of` [ep]: the rule's node per EP rank (`rule_nodes`)."""
    ep, E = len(node_of), len(holders)
    lens = np.fromiter(map(len, holders), dtype=np.int64, count=E)
    cols = np.fromiter(chain.from_iterable(holders), dtype=np.int64, count=int(lens.sum()))
    if share is None and (lens == 1).all():
        return np.bincount(cols, weights=frac, minlength=ep) * assign, None
    counts = (np.full((ep, E), 1.0 / ep) if share is None else share) * frac[None, :] * assign  # [ep, E]
    single = lens == 1
    # tokens[s, d] accumulates, one addition at a time, the single copies' counts (by expert)
    # and then the replicas' splits (by expert, copy): one bincount over (s, d) in that order
    # (what np.add.at did in two passes, at a fraction of its cost)
    idx, val = [], []
    if single.any():  # one copy: the rule is trivial
        d = cols[np.repeat(single, lens)]  # [S] each single expert's rank
        idx.append((np.arange(ep)[:, None] * ep + d[None, :]).ravel())  # [ep, S]: per (s, d), experts ascending
        val.append(counts[:, single].ravel())
    rep = np.flatnonzero(~single)
    if len(rep):
        table = copy_table([holders[e] for e in rep], node_of)
        split = split_over_copies(counts[:, rep], table)  # [ep, R, W]
        idx.append((np.arange(ep)[:, None, None] * ep + table.slot[None]).ravel())
        val.append(split.ravel())
    tokens = np.bincount(np.concatenate(idx), weights=np.concatenate(val), minlength=ep * ep).reshape(ep, ep)
    return tokens.sum(0), tokens


# ------------------------------------------------------------------ the rule in closed form (even origins)
#
# With tokens starting evenly spread (no origin statistics) every source sends c_e = f_e *
# assign / ep tokens to expert e, and the rule needs no matching of ranges: a source holding a
# copy keeps its c_e; the k copies in a node of L ranks share the c_e of its L - k other ranks
# equally (their loads are equal, c_e each); the ranks of nodes without a copy water-fill the
# copies, whose loads are then c_e * L / k. What the all-to-all model reads when all links of a
# class (inside a node, across nodes) are alike is each rank's tokens sent and received per
# class, and whether it exchanges any with a peer of the class (the latency term): `ClassSums`.
# The placers' evaluator uses it (no [ep, ep] matrix, all layers at once); it equals the general
# rule to rounding (tests/test_placers.py).


@dataclass
class ClassSums:
    """One MoE layer's dispatch by link class: tokens each EP rank sends to / receives from
    other ranks of its node (row 0) and of other nodes (row 1), [2, ep] each, and whether any
    peer of the class exchanges a positive amount with it (bool [2, ep])."""

    send: np.ndarray
    recv: np.ndarray
    send_on: np.ndarray
    recv_on: np.ndarray


_FLAT: dict = {}  # id of each layer's holders -> (the holders, copies per expert, EP rank of every copy)


def _flat_holders(maps: Sequence, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(copies per (layer, expert), EP rank of every copy) of n layers' holders, cached on the
    holder lists' identities: a robust placer scores one plan under many load scenarios."""
    key = tuple(map(id, maps))
    hit = _FLAT.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], maps)):
        return hit[1], hit[2]
    lens = np.fromiter(map(len, chain.from_iterable(maps)), dtype=np.int64, count=count)
    cols = np.fromiter(chain.from_iterable(chain.from_iterable(maps)), dtype=np.int64, count=int(lens.sum()))
    if len(_FLAT) > 32:
        _FLAT.clear()
    _FLAT[key] = (list(maps), lens, cols)
    return lens, cols


def uniform_exchanges(maps: Sequence[Sequence[Sequence[int]]], frac: np.ndarray, assign: float, node_of: np.ndarray
                      ) -> tuple[np.ndarray, list[Optional[ClassSums]]]:
    """`layer_exchange` with evenly spread origins for n layers at once (maps[i]: layer i's
    holders, frac [n, E]): (routed [n, ep], per layer None when every expert has one copy (the
    even pattern, computed as layer_exchange does) else its ClassSums)."""
    frac = np.asarray(frac, dtype=np.float64)
    n, E = frac.shape
    node_of = np.asarray(node_of)
    ep = len(node_of)
    _, node = np.unique(node_of, return_inverse=True)
    G = int(node.max()) + 1
    size = np.bincount(node, minlength=G).astype(np.float64)
    lens, cols = _flat_holders(maps, n * E)
    le = np.repeat(np.arange(n * E), lens)  # layer * E + expert of every copy
    lay = le // E
    dst = lay * ep + cols  # (layer, EP rank) of every copy
    replicated = np.bincount(le // E, weights=lens[le] > 1, minlength=n) > 0  # [n] layers with a replica
    routed = np.zeros((n, ep))
    one = ~replicated[lay]
    if one.any():  # as layer_exchange: the bincount of the shares, times the assignments
        routed[~replicated] = (np.bincount(dst[one], weights=frac.ravel()[le[one]], minlength=n * ep).reshape(n, ep)[~replicated] * assign)
    sums: list[Optional[ClassSums]] = [None] * n
    if not replicated.any():
        return routed, sums
    keep = ~one
    le, lay, dst, cols = le[keep], lay[keep], dst[keep], cols[keep]
    ce = (1.0 / ep) * frac * assign  # [n, E] tokens every source routes to e (layer_exchange's counts)
    cn = node[cols]
    k = np.bincount(le * G + cn, minlength=n * E * G).reshape(n, E, G)
    has = k > 0
    c = ce.ravel()[le]
    kk = k.reshape(-1)[le * G + cn]
    x1 = (size[cn] - kk) * c / kk  # from the copy's node-mates without a copy
    pool = ce * (ep - (has * size).sum(2))  # [n, E] from the nodes without a copy
    # tier 2: water-fill each expert's copies (loads c * L / k) with its pool
    lens_k = np.bincount(le, minlength=n * E)
    start = np.cumsum(lens_k) - lens_k
    pos = np.arange(len(le)) - start[le]
    lo = c + x1
    one = lens_k[le] == 1  # a single copy takes its whole pool: the water-fill's arithmetic on one copy
    tot = pool.ravel()[le[one]] + lo[one]
    x2 = np.zeros(len(le))
    x2[one] = np.where(0 < tot, tot - lo[one], 0.0)
    if not one.all():  # experts with copies: water-filled (le ascends: the distinct ids in order, no sort)
        ids = np.flatnonzero(lens_k > 1)
        inv = np.repeat(np.arange(len(ids)), lens_k[ids])
        W = int(lens_k.max())
        load = np.zeros((len(ids), W))
        mask = np.zeros((len(ids), W), dtype=bool)
        p_m = pos[~one]
        load[inv, p_m] = lo[~one]
        mask[inv, p_m] = True
        x2[~one] = _waterfill(_NumpyOps, load, mask, pool.ravel()[ids], False)[inv, p_m]
    flat_n = n * ep
    routed_rep = np.bincount(dst, weights=lo + x2, minlength=flat_n).reshape(n, ep)
    routed[replicated] = routed_rep[replicated]
    recv = np.stack([np.bincount(dst, weights=x, minlength=flat_n).reshape(n, ep) for x in (x1, x2)], 1)  # [n, 2, ep]
    recv_on = np.stack([np.bincount(dst, weights=x > 0, minlength=flat_n).reshape(n, ep) > 0 for x in (x1, x2)], 1)
    # sends: a source in node g sends c_e inside the node when g holds a copy of e and it does not, else across
    pos_e = ce > 0
    near = np.einsum("neg,ne->ng", has.astype(np.float64), ce)
    far = np.einsum("neg,ne->ng", (~has).astype(np.float64), ce)
    near_on = (has & pos_e[:, :, None]).sum(1)
    far_on = (~has & pos_e[:, :, None]).sum(1)
    own = np.bincount(dst, weights=c, minlength=flat_n).reshape(n, ep)
    own_on = np.bincount(dst, weights=c > 0, minlength=flat_n).reshape(n, ep)
    intra_on = near_on[:, node] - own_on > 0
    send = np.stack([np.where(intra_on, np.maximum(near[:, node] - own, 0.0), 0.0), far[:, node]], 1)
    send_on = np.stack([intra_on, far_on[:, node] > 0], 1)
    for i in np.flatnonzero(replicated):
        sums[i] = ClassSums(send[i], recv[i], send_on[i], recv_on[i])
    return routed, sums


def uniform_links(topology: Topology, group: Any, node_of: np.ndarray) -> Optional[tuple[tuple[float, float], tuple[float, float]]]:
    """((1/bandwidth, latency) inside a node, (the same) across nodes) of `group` when every link
    of a class is alike and the rule's nodes (`node_of`, rule_nodes) are the group's real ones
    (then ClassSums gives `all_to_all_time` exactly); else None. A class without links: (0, 0)."""
    g = np.asarray(group, dtype=np.int64)
    rule_same = np.asarray(node_of)[:, None] == np.asarray(node_of)[None, :]
    same = topology.same_node(g[:, None], g[None, :])
    if len(g) != len(rule_same) or not np.array_equal(same, rule_same):
        return None
    inv = 1.0 / topology.bandwidth[np.ix_(g, g)]
    lat = topology.latency[np.ix_(g, g)]
    out = []
    for mask in (same & ~np.eye(len(g), dtype=bool), ~same):
        if not mask.any():
            out.append((0.0, 0.0))
            continue
        i, la = inv[mask], lat[mask]
        if not ((i == i[0]).all() and (la == la[0]).all()):
            return None
        out.append((float(i[0]), float(la[0])))
    return tuple(out)  # type: ignore[return-value]


def class_sums_time(sums: Sequence[ClassSums], bytes_per_token: float, links: tuple) -> np.ndarray:
    """[n] seconds of each layer's dispatch + combine (`exchange_time`, flat) from its ClassSums
    on a group with `uniform_links` `links`. The combine is the transposed exchange: sends and
    receives swap, so it lasts as long as the dispatch."""
    send = np.stack([s.send for s in sums])  # [n, 2, ep]
    recv = np.stack([s.recv for s in sums])
    s_on = np.stack([s.send_on for s in sums])
    r_on = np.stack([s.recv_on for s in sums])
    worst = np.zeros(len(sums))
    for m, (inv, lat) in enumerate(links):
        t_s = send[:, m] * bytes_per_token * inv + np.where(s_on[:, m], lat, 0.0)
        t_r = recv[:, m] * bytes_per_token * inv + np.where(r_on[:, m], lat, 0.0)
        worst = np.maximum(worst, np.maximum(t_s, t_r).max(-1))
    return worst + worst


def _hier_phases(tokens: np.ndarray, group: Any, topology: Topology) -> tuple[np.ndarray, np.ndarray]:
    """Tutel's 2DH order as two exchanges: (within each node: s -> the rank of s's node with the
    destination's local index, across nodes: that rank -> the destination)."""
    node = topology.node_of[np.asarray(group, dtype=np.int64)]
    local = np.zeros(len(node), dtype=np.int64)
    sizes = {}
    for i, n in enumerate(node):
        local[i] = sizes.get(n, 0)
        sizes[n] = local[i] + 1
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"parallel.a2a=hierarchical needs the EP group to hold as many ranks on every node it spans (it has {sorted(sizes.values())}): "
                          "pick parallel.ep as a multiple or divisor of topology.devices_per_node, or parallel.a2a=flat")
    same_node = node[:, None] == node[None, :]
    same_local = local[:, None] == local[None, :]
    intra = (tokens @ same_local) * same_node  # [s, r]: s hands r what goes to r's local index anywhere
    inter = (same_node.astype(np.float64) @ tokens) * (same_local & ~same_node)  # [r, d]: node(r)'s tokens for d
    return intra, inter


def exchange_time(tokens_bytes: Optional[np.ndarray], routed_bytes: np.ndarray, group: Any, topology: Topology, a2a: str = "flat") -> float:
    """Seconds of one MoE layer's dispatch + combine on `group`: `tokens_bytes` [ep, ep] source ->
    destination bytes (None: evenly spread origins, `routed_bytes` [ep] received per rank)."""
    if a2a == "flat":
        if tokens_bytes is None:
            return 2 * topology.dispatch_time(routed_bytes, group)
        return float(topology.all_to_all_time(tokens_bytes, group) + topology.all_to_all_time(tokens_bytes.T, group))
    b = np.broadcast_to(routed_bytes[None, :] / len(routed_bytes), (len(routed_bytes),) * 2) if tokens_bytes is None else tokens_bytes
    t = 0.0
    for phase in _hier_phases(b, group, topology):  # dispatch: intra then inter; combine: the reverse exchanges
        t += topology.all_to_all_time(phase, group) + topology.all_to_all_time(phase.T, group)
    return float(t)


def exchange_traffic(tokens_bytes: Optional[np.ndarray], routed_bytes: np.ndarray, group: Any, topology: Topology, a2a: str = "flat"
                     ) -> tuple[float, float, int, int]:
    """(intra-node bytes, inter-node bytes, intra-node messages, inter-node messages) of one
    dispatch (the combine moves the same back). Bytes a rank keeps are not counted."""
    g = np.asarray(group, dtype=np.int64)
    n = len(g)
    if a2a == "flat" and tokens_bytes is None:
        i_b, x_b = topology.dispatch_bytes_split(routed_bytes, g)
        b = np.broadcast_to(routed_bytes[None, :] / n, (n, n))
        phases = [b]
    else:
        b = np.broadcast_to(routed_bytes[None, :] / n, (n, n)) if tokens_bytes is None else tokens_bytes
        phases = [b] if a2a == "flat" else list(_hier_phases(b, g, topology))
        i_b = x_b = None
    same = topology.same_node(g[:, None], g[None, :])
    off = ~np.eye(n, dtype=bool)
    ib = sum(float((p * (same & off)).sum()) for p in phases)
    xb = sum(float((p * ~same).sum()) for p in phases)
    im = sum(int(((p > 0) & same & off).sum()) for p in phases)
    xm = sum(int(((p > 0) & ~same).sum()) for p in phases)
    return (ib if i_b is None else i_b), (xb if x_b is None else x_b), im, xm
