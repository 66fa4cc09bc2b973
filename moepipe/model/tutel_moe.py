"""Tutel's moe_layer as an expert backend (a baseline), where `import tutel` works.

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
  Tutel's capacity (all on device);
- aux loss: Tutel's l_aux (GShard, first choices) for aux_loss_type=top1; the Switch loss over
  Tutel's k choices for switch; router z-loss on the gate's logits; shared experts are a
  SwiGLU beside the routed ones.
What it cannot honour is rejected by `check_config` before any worker starts.
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moepipe.config import ConfigError, MoEConfig
from moepipe.model.layers import SwiGLU
from moepipe.model.moe import AttachAuxLoss, RoutingStats
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


def tutel_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int | None:
    """Tutel's per-expert slots from one source rank (its extract_critical rule, alignment 1):
    k * floor(|cf| * ceil(T/E)); None when dropless (cf == 0). For cf < 0 Tutel further lowers
    it to the busiest expert's need, which never changes min(demand, cap)."""
    if capacity_factor == 0:
        return None
    k = min(top_k, num_experts)
    return k * int(abs(capacity_factor) * math.ceil(num_tokens / num_experts))


class _Gate(nn.Module):
    """Tutel's custom gate: logits from the owning layer's Router (kept outside Tutel's module
    tree, so the weight has one name). Remembers the logits for the z-loss and Switch loss."""

    def __init__(self, model_dim: int, num_global_experts: int, k: int, capacity_factor: float, logits_fn):
        super().__init__()
        self.top_k, self.capacity_factor, self.gate_noise = k, capacity_factor, 0.0
        self.logits_fn = logits_fn
        self.last_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_logits = self.logits_fn(x)
        return self.last_logits


def _llama_ffn_class():
    from tutel.experts.llama_ffn import LlamaFFNNetwork

    class HeldLlamaFFN(LlamaFFNNetwork):
        """llama_ffn over unsharded experts (sharded_count=1). Its gather would create Tutel
        groups from the world, which Tutel cannot nest under an EP sub-group (pp x ep); for
        one shard the gathered weight is the weight itself."""

        def _get_gathered_param(self, param, full_shape, parent_group):
            return param.view(full_shape)

    return HeldLlamaFFN


class _Experts(nn.Module):
    """Tutel's custom expert module: Tutel's llama_ffn run on the owning layer's stacked
    per-expert weights (it holds no parameters of its own)."""

    def __init__(self, model_dim: int, num_experts_per_device: int, sharded_count: int, hidden_size_per_expert: int, weights_fn):
        super().__init__()
        if sharded_count != 1:
            raise ValueError(f"Tutel shards experts over {sharded_count} ranks: moepipe needs whole experts per EP rank")
        with torch.device("meta"):  # shapes only: the weights come from weights_fn each call
            ffn = _llama_ffn_class()(model_dim, hidden_size_per_expert, num_experts_per_device, 1)
        for name in ("W_fc1", "W_fc2", "W_fc3"):
            delattr(ffn, name)
        self.ffn, self.weights_fn = ffn, weights_fn

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        self.ffn.W_fc1, self.ffn.W_fc2, self.ffn.W_fc3 = self.weights_fn()
        try:
            return self.ffn(x, ctx)
        finally:  # do not keep this call's stacked weights (and their graph) alive
            self.ffn.W_fc1 = self.ffn.W_fc2 = self.ffn.W_fc3 = None


class TutelMoE(nn.Module):
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
        # Tutel's layer holds no state of ours (gate and experts read the modules above). It is
        # built for the EP group it will talk to, so only once that group is known.
        self._tutel = None
        self._group, self._use_2dh, self._local = None, False, list(range(cfg.num_experts))

    # ---- wiring Tutel's layer

    def _build_tutel(self) -> None:
        from tutel import moe as tutel_moe

        if self._group is None and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("TutelMoE in a multi-process job needs attach_expert_group() before its first forward")
        self._tutel = tutel_moe.moe_layer(
            gate_type={"type": "custom", "module": _Gate, "k": self.cfg.top_k, "capacity_factor": self.cfg.capacity_factor,
                       "logits_fn": self.router.logits},
            model_dim=self.d_model,
            experts={"type": "custom", "module": _Experts, "count_per_node": len(self._local),
                     "hidden_size_per_expert": self.cfg.expert_hidden, "weights_fn": self._stacked_weights},
            group=self._group,
            normalize_gate=self.cfg.normalize_weights,
            batch_prioritized_routing=False,
            is_gshard_loss=True,
            use_2dh=self._use_2dh,
        )

    def _stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """llama_ffn computes silu(x W_fc1) * (x W_fc2) W_fc3: W_fc1 = w1^T, W_fc2 = w3^T, W_fc3 = w2^T."""
        held = [self.experts[str(e)] for e in self._local]
        return (torch.stack([m.w1.weight.t() for m in held]), torch.stack([m.w3.weight.t() for m in held]),
                torch.stack([m.w2.weight.t() for m in held]))

    def attach_expert_group(self, holders: list[list[int]], ep_rank: int, ep_group, a2a: str = "flat", local_size: int = 1) -> None:
        """Tutel's expert parallelism: EP rank r must hold the r-th contiguous, equal block of experts."""
        ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        per = self.num_experts // ep
        want = [[e // per] for e in range(self.num_experts)]
        if self.num_experts % ep or [list(h) for h in holders] != want:
            raise ValueError(f"moe.backend=tutel needs experts in {ep} contiguous equal blocks, one per EP rank (the static plan); got {holders}")
        self._local = list(range(ep_rank * per, (ep_rank + 1) * per))
        # Even a group of one is passed: with group=None Tutel would count the whole world.
        self._group = ep_group if dist.is_initialized() else None
        self._use_2dh = a2a == "hierarchical" and ep > 1
        if self._use_2dh:
            _set_local_size(local_size)
        self._tutel = None

    # ---- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tutel is None:
            self._build_tutel()
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = self._tutel(flat)
        logits = self._tutel.gates[0].last_logits
        self._tutel.gates[0].last_logits = None
        aux = self._aux_loss(logits, out.l_aux)
        z = router_z_loss(logits)
        if self.record_stats:
            self._record(flat.shape[0], aux, z)
        if self.shared is not None:
            out = out + self.shared(flat)
        out = out.reshape(shape)
        if (self.cfg.aux_loss_coef > 0 or self.cfg.z_loss_coef > 0) and self.training and torch.is_grad_enabled():
            loss = self.cfg.aux_loss_coef * aux + self.cfg.z_loss_coef * z
            out = AttachAuxLoss.apply(out, loss * self.aux_loss_scale)
        return out

    def _aux_loss(self, logits: torch.Tensor, tutel_l_aux: torch.Tensor) -> torch.Tensor:
        if self.cfg.aux_loss_type == "top1" or self.cfg.top_k == 1:
            return tutel_l_aux  # GShard's loss: first choices only, as moepipe's top1
        probs = F.softmax(logits.float(), dim=-1)
        choices = probs.topk(min(self.cfg.top_k, self.num_experts), dim=-1).indices  # Tutel's choices: same scores, same topk
        return load_balancing_loss(probs, choices, self.num_experts, top1_only=False)

    def _record(self, num_tokens: int, aux: torch.Tensor, z: torch.Tensor) -> None:
        demand = self._tutel.dispatch_count.reshape(-1).long()  # Tutel's per-expert assignment count
        cap = tutel_capacity(num_tokens, self.num_experts, self.cfg.top_k, self.cfg.capacity_factor)
        kept = demand if cap is None else demand.clamp(max=cap)
        self.stats.add(demand, kept, aux, z)

    # ---- the rest of the backend interface

    def update_expert_bias(self, load=None) -> None:
        """No selection bias under Tutel (moe.bias_update_rate > 0 is rejected by check_config)."""

    def set_routing_skew(self, offset: torch.Tensor | None) -> None:
        """An injected [E] logit offset (workload.kind), added by the Router to Tutel's gate logits."""
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
