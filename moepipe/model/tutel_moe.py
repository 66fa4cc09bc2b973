"""Tutel as an expert backend (a baseline), where `import tutel` works.

Tutel routes, dispatches (its fast encode/decode kernels), exchanges tokens over the EP group
with its own all-to-all (flat, or 2DH: `parallel.a2a=hierarchical`) and runs the experts with
its SwiGLU `llama_ffn`. The weights stay moepipe's: `router.weight` and one SwiGLU module per
expert (`experts.<global id>.w1/w2/w3`), named exactly like the native layer's, so stage
pruning, initialisation by name, gradient sync, checkpoints and the native<->tutel comparison
need nothing Tutel-specific. Each forward stacks the held experts' weights into the
[E_local, d, h] tensors llama_ffn multiplies by (one copy of the expert weights per call).

Semantics (same as native where the names agree):
- softmax top-k on fp32 logits from moepipe's Router (input jitter and injected skew included);
  k weights renormalised before capacity (Tutel's normalize_gate = moe.normalize_weights);
- moe.capacity_factor keeps its sign convention (>0 capped, 0 dropless, <0 the busiest
  expert's need capped at |cf|), with Tutel's cap k * floor(|cf| * ceil(T/E)) per expert and
  source rank (native: ceil(k * |cf| * T / E)); first choices before second ones, then token
  order (drop_policy=position);
- routing statistics: demand = Tutel's own per-expert dispatch count, kept = demand capped at
  the capacity Tutel's routing chose (device tensors, no read-back of ours);
- aux loss: Tutel's l_aux (GShard, first choices) for aux_loss_type=top1; the Switch loss over
  Tutel's k choices for switch; router z-loss on the gate's logits; shared experts are a
  SwiGLU beside the routed ones.
What it cannot honour is rejected by `check_config` before any worker starts.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moepipe.config import ConfigError, MoEConfig
from moepipe.model.layers import SwiGLU
from moepipe.model.moe import AttachAuxLoss
from moepipe.model.routing_stats import RoutingStats
from moepipe.model.router import Router, load_balancing_loss, router_z_loss


def build_tutel_moe(d_model: int, cfg: MoEConfig) -> nn.Module:
    try:
        from tutel import moe as tutel_moe  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"moe.backend=tutel but Tutel is not importable ({err}): Tutel is not on the package registries; "
            "build it from a source checkout (python -m pip install --no-build-isolation <path-to-tutel>) or use moe.backend=native"
        ) from None
    return TutelMoE(d_model, cfg)


def _held_llama_ffn(d_model: int, hidden: int, num_local: int) -> nn.Module:
    """Tutel's llama_ffn (silu(x W_fc1) * (x W_fc2) W_fc3 over [E_local, tokens, d]) as a
    function of weights handed in per call: built on the meta device (shapes only), its own
    parameters removed. It holds whole experts (sharded_count=1), so its gather of sharded
    weights is the identity; skipping it also skips the Tutel group creation that this
    version cannot nest under an EP sub-group ("Splitting nesting groups from a subgroup")."""
    from tutel.experts.llama_ffn import LlamaFFNNetwork

    class HeldLlamaFFN(LlamaFFNNetwork):
        def _get_gathered_param(self, param, full_shape, parent_group):
            return param.view(full_shape)

    with torch.device("meta"):
        ffn = HeldLlamaFFN(d_model, hidden, num_local, 1)
    for name in ("W_fc1", "W_fc2", "W_fc3"):
        delattr(ffn, name)
    return ffn


_NO_GROUP = SimpleNamespace(group=None)


class TutelMoE(nn.Module):
    """Tutel's MoE primitives (tutel.moe.top_k_routing / fast_encode / fast_decode, tutel.net's
    all-to-all, llama_ffn) over moepipe's weights. Its moe_layer is not used: in this Tutel
    version the backward of its flat all-to-all exchanges over the default (world) group
    whatever `group=` says, which deadlocks an EP sub-group (pp x ep); tutel.net.all_to_all_single
    keeps the group in backward."""

    def __init__(self, d_model: int, cfg: MoEConfig, expert_ids: list[int] | None = None):
        super().__init__()
        self.cfg, self.d_model = cfg, d_model
        self.num_experts = cfg.num_experts
        self.router = Router(d_model, cfg.num_experts, jitter=cfg.router_jitter)
        ids = range(cfg.num_experts) if expert_ids is None else expert_ids
        self.experts = nn.ModuleDict({str(e): SwiGLU(d_model, cfg.expert_hidden) for e in ids})
        shared_hidden = (cfg.shared_expert_hidden or cfg.expert_hidden) * cfg.num_shared_experts
        self.shared = SwiGLU(d_model, shared_hidden) if cfg.num_shared_experts > 0 else None
        self.stats = RoutingStats(cfg.num_experts)
        self.record_stats = True
        self.aux_loss_scale = 1.0
        self.last_capacity: int | None = None  # Tutel's slots per expert in the last forward
        self._group, self._ep, self._use_2dh = None, 1, False
        self._local = list(range(cfg.num_experts))
        self._ffn = _held_llama_ffn(d_model, cfg.expert_hidden, len(self._local))

    def attach_expert_group(self, holders: list[list[int]], ep_rank: int, ep_group, a2a: str = "flat", local_size: int = 1,
                            node_groups=None) -> None:
        """Tutel's expert parallelism: EP rank r must hold the r-th contiguous, equal block of experts.
        Its 2DH exchange makes its own node groups (`node_groups` is the native exchange's)."""
        ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        per = self.num_experts // ep
        want = [[e // per] for e in range(self.num_experts)]
        if self.num_experts % ep or [list(h) for h in holders] != want:
            raise ValueError(f"moe.backend=tutel needs experts in {ep} contiguous equal blocks, one per EP rank (the static plan); got {holders}")
        self._local = list(range(ep_rank * per, (ep_rank + 1) * per))
        self._group, self._ep = (ep_group, ep) if ep > 1 else (None, 1)
        self._use_2dh = a2a == "hierarchical" and ep > 1
        if self._use_2dh:
            _set_local_size(local_size)
        self._ffn = _held_llama_ffn(self.d_model, self.cfg.expert_hidden, per)

    # ---- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tutel import moe as tmoe
        from tutel.impls import losses

        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router.logits(flat)  # fp32; jitter and injected skew as in the native router
        k = min(self.cfg.top_k, self.num_experts)
        crit, l_aux = tmoe.top_k_routing(
            torch.softmax(logits, dim=-1), top_k=k, loss_fn=losses.gshard_loss, capacity_factor=self.cfg.capacity_factor,
            batch_prioritized_routing=False, normalize_gate=self.cfg.normalize_weights, group=self._group,
        )
        y = tmoe.fast_encode(flat.float().contiguous(), crit)  # [E, capacity, d]
        y = self._experts(y)
        out = tmoe.fast_decode(y.float().contiguous(), crit).to(x.dtype)
        aux, z = self._aux_loss(logits, l_aux), router_z_loss(logits)
        self.last_capacity = int(crit[4])
        if self.record_stats:
            demand = crit[-1].reshape(-1).long()  # Tutel's per-expert assignment count (before capacity)
            self.stats.add(demand, demand.clamp(max=self.last_capacity), aux, z)
        if self.shared is not None:
            out = out + self.shared(flat)
        out = out.reshape(shape)
        if (self.cfg.aux_loss_coef > 0 or self.cfg.z_loss_coef > 0) and self.training and torch.is_grad_enabled():
            loss = self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z
            out = AttachAuxLoss.apply(out, loss * self.aux_loss_scale)
        return out

    def _experts(self, y: torch.Tensor) -> torch.Tensor:
        """[E, C, d] slots -> expert outputs in the same layout; under EP through Tutel's all-to-all."""
        from tutel import net

        if self._ep > 1 and self._use_2dh:
            return net.all_to_all(self._ffn_call(net.all_to_all(y, 1, 0, use_2dh=True)), 0, 1, use_2dh=True)
        if self._ep > 1:
            w, (e, c, d) = self._ep, y.shape
            got = net.all_to_all_single(y.contiguous(), group=self._group)  # block s: rank s's slots for my experts
            local = got.view(w, e // w, c, d).transpose(0, 1).reshape(e // w, w * c, d)
            out = self._ffn_call(local).view(e // w, w, c, d).transpose(0, 1).contiguous()
            return net.all_to_all_single(out, group=self._group).view(e, c, d)
        return self._ffn_call(y)

    def _ffn_call(self, y: torch.Tensor) -> torch.Tensor:
        """llama_ffn on this rank's experts: W_fc1 = w1^T, W_fc2 = w3^T, W_fc3 = w2^T, stacked per call."""
        held = [self.experts[str(e)] for e in self._local]
        ffn = self._ffn
        ffn.W_fc1 = torch.stack([m.w1.weight.t() for m in held])
        ffn.W_fc2 = torch.stack([m.w3.weight.t() for m in held])
        ffn.W_fc3 = torch.stack([m.w2.weight.t() for m in held])
        try:
            return ffn(y.to(ffn.W_fc1.dtype), _NO_GROUP)  # ctx: only .group is read, by the skipped gather
        finally:  # do not keep this call's stacked weights (and their graph) alive
            ffn.W_fc1 = ffn.W_fc2 = ffn.W_fc3 = None

    def _aux_loss(self, logits: torch.Tensor, tutel_l_aux: torch.Tensor) -> torch.Tensor:
        if self.cfg.aux_loss_type == "top1" or self.cfg.top_k == 1:
            return tutel_l_aux  # GShard's loss: first choices only, as moepipe's top1
        probs = F.softmax(logits, dim=-1)
        choices = probs.topk(min(self.cfg.top_k, self.num_experts), dim=-1).indices  # Tutel's choices: same scores, same topk
        return load_balancing_loss(probs, choices, self.num_experts, top1_only=False)

    # ---- the rest of the backend interface

    def update_expert_bias(self, load=None) -> None:
        """No selection bias under Tutel (moe.bias_update_rate > 0 is rejected by check_config)."""

    def set_routing_skew(self, offset: torch.Tensor | None) -> None:
        """An injected [E] logit offset (workload.kind), added by the Router to the logits Tutel routes on."""
        self.router.skew = None if offset is None else offset.to(self.router.weight.device)


def _set_local_size(local_size: int) -> None:
    """Tutel's 2DH all-to-all learns the devices per node from $LOCAL_SIZE (read once per process)."""
    from tutel.impls.communicate import PrimAllToAll2D

    if local_size < 2:
        raise ValueError(f"parallel.a2a=hierarchical needs >= 2 devices per node, got {local_size}")
    known = PrimAllToAll2D.LOCAL_SIZE or int(os.environ.get("LOCAL_SIZE", local_size))
    if known != local_size:
        raise ValueError(f"Tutel's 2DH all-to-all already uses LOCAL_SIZE={known}, not {local_size}")
    os.environ["LOCAL_SIZE"] = str(local_size)


def _fail(field: str, value, problem: str, fix: str) -> None:
    raise ConfigError(f"{field}={value} {problem}: {fix}")


def check_config(cfg) -> None:
    """Options moe.backend=tutel cannot honour: one-line ConfigError (called by config.validate)."""
    e, par = cfg.moe, cfg.parallel
    native = "or use moe.backend=native"
    if e.score_func != "softmax":
        _fail("moe.score_func", e.score_func, "is not available with moe.backend=tutel (Tutel's gate is a softmax)", f"set moe.score_func=softmax {native}")
    if e.bias_update_rate > 0:
        _fail("moe.bias_update_rate", e.bias_update_rate, "needs a selection-only expert bias, which Tutel's top-k has no place for",
              f"set moe.bias_update_rate=0 {native}")
    capped = e.capacity_factor != 0
    if capped and e.drop_policy != "position":
        _fail("moe.drop_policy", e.drop_policy, "is not Tutel's drop order (first choices, then token order)",
              f"set moe.drop_policy=position, moe.capacity_factor=0 {native}")
    if capped and e.normalize_after_drop and e.normalize_weights and e.top_k > 1:
        _fail("moe.normalize_after_drop", "true", "is not available with moe.backend=tutel (Tutel renormalises the k weights before capacity)",
              f"set moe.normalize_after_drop=false {native}")
    world = par.pp * par.ep * par.dp
    if par.ep > 1 and e.num_experts % par.ep:
        _fail("moe.num_experts", e.num_experts, f"does not split into parallel.ep={par.ep} equal blocks, which Tutel's all-to-all needs",
              "pick a multiple of parallel.ep")
    if world > 1 and cfg.placer.interval > 0 and cfg.placer.name != "static":
        _fail("placer.name", cfg.placer.name, "re-plans and migrates layers and experts, but Tutel's layers are wired to the static plan",
              f"use placer=static (or placer.interval=0) {native}")
    if world > 1 and par.ep > 1 and cfg.placer.replica_slots > 0:
        _fail("placer.replica_slots", cfg.placer.replica_slots, "asks for expert replicas, which Tutel's all-to-all cannot address",
              f"set placer.replica_slots=0 {native}")
    if par.a2a == "hierarchical":
        _check_2dh(cfg)


def _check_2dh(cfg) -> None:
    par, local = cfg.parallel, cfg.topology.devices_per_node
    if par.ep < 2:
        _fail("parallel.a2a", "hierarchical", f"needs expert parallelism (parallel.ep={par.ep})", "set parallel.ep >= 2 or parallel.a2a=flat")
    if par.pp * par.dp > 1:
        _fail("parallel.a2a", "hierarchical", f"uses Tutel's 2DH all-to-all, which spans the whole world, not an EP sub-group (parallel.pp*dp={par.pp * par.dp})",
              "set parallel.pp=1 parallel.dp=1 or parallel.a2a=flat")
    if local < 2 or par.ep % local:
        _fail("topology.devices_per_node", local, f"must be >= 2 and divide parallel.ep={par.ep} for the 2DH all-to-all (nodes of equal size)",
              "describe the nodes (e.g. topology.nodes=2 topology.devices_per_node=2) or set parallel.a2a=flat")
