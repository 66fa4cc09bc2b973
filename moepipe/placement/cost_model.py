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
from typing import Any, Mapping, Optional

import numpy as np

from moepipe.config import ConfigError
from moepipe.placement.model_spec import ModelSpec
from moepipe.placement.plan import Plan, rank_grid
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

    def __init__(self, spec: ModelSpec, efficiency: float = 0.5, profile: Optional[Profile | Mapping | str] = None, ep_splits_tokens: bool = True):
        if not 0 < efficiency <= 1:
            raise ConfigError(f"cost_model.efficiency={efficiency} must be in (0, 1]: the fraction of sustained FLOP/s a layer reaches")
        self.spec, self.efficiency, self.ep_splits_tokens = spec, efficiency, ep_splits_tokens
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
        return float(comp.max() + 2 * topology.dispatch_time(routed * bpt, group))

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


def routed_tokens(plan: Plan, spec: ModelSpec, routing: Any = None) -> np.ndarray:
    """[n_moe_layers, ep] token-expert assignments per microbatch landing on each EP rank.

    `routing` gives per-expert counts per MoE layer ([n_moe, E] array, or {layer: [E]}); only
    proportions matter: each layer is rescaled to tokens_per_microbatch * top_k. None: uniform.
    Replicas of an expert share its tokens equally.
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
    share = np.zeros((len(moe), E, plan.ep))
    for li, l in enumerate(moe):
        for e, ranks in enumerate(plan.expert_map[l]):
            share[li, e, ranks] = 1.0 / len(ranks)
    return np.einsum("le,ler->lr", frac, share) * spec.tokens_per_microbatch * spec.top_k


def stage_costs(
    cm: CostModel, plan: Plan, topology: Topology, routing: Any = None, free_comm: bool = False, grad_bytes: int = 4
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
    routed = routed_tokens(plan, spec, routing)  # [n_moe, ep]
    moe_row = {l: i for i, l in enumerate(spec.moe_layers)}

    comp = np.zeros((S, 3))
    a2a = np.zeros((S, 3))
    act = np.zeros((S, plan.dp, plan.ep))
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
            act[s] += spec.head_act_elems * T_e * spec.dtype_bytes
        if extra.any():
            t = extra[:, None, None] * T_e / r[None]
            comp_s += t.max(-1)
            busy[s] += t
        for l in range(a, b):
            lay = spec.layers[l]
            t = cm.dense_work[l][:, None, None] * T_e / r[None]  # [3, dp, ep]
            act[s] += lay.act_elems * T_e * spec.dtype_bytes
            if lay.is_moe:
                routed_l = routed[moe_row[l]]  # [ep]
                t = t + cm.expert_work[l][:, None, None] * routed_l[None, None, :] / r[None]
                act[s] += lay.expert_act_elems * routed_l[None, :] * spec.dtype_bytes
                if not free_comm and plan.ep > 1:
                    for d in range(plan.dp):
                        a2a_s[d] += 2 * topology.dispatch_time(routed_l * bpt, grid[p, d])  # dispatch + combine
                        i_b, x_b = topology.dispatch_bytes_split(routed_l * bpt, grid[p, d])
                        intra += 2 * i_b * (3 if ckpt else 2)  # fwd and bwd (and the recomputed fwd)
                        inter += 2 * x_b * (3 if ckpt else 2)
            comp_s += t.max(-1)
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
    return StageCosts(comp, a2a, send, act, busy, intra, inter, p2p_bytes, grad, cm.work_per_microbatch(), rates)


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
        t_exp = 0.0
        if plan.dp > 1:  # runs after the dense all-reduce on the same links
            n_exp = np.zeros(plan.ep)  # expert parameters each EP rank holds (replicas included)
            for l in layers:
                if spec.layers[l].is_moe:
                    held = np.fromiter(chain.from_iterable(plan.expert_map[l]), dtype=np.int64)
                    n_exp += np.bincount(held, minlength=plan.ep) * spec.layers[l].expert_params
            t_exp = max(topology.all_reduce_time(float(n_exp[e]) * grad_bytes, grid[p, :, e]) for e in range(plan.ep))
        worst = max(worst, t + t_exp)
    return worst
