"""The mixture-of-experts FFN: route, permute tokens by expert, run each expert on its
contiguous slice, weight and scatter back.

Experts are separate modules in a ModuleDict keyed by global expert id. That keeps the
parameter names stable (`...moe.experts.7.w1.weight`) whichever rank holds expert 7, so
plans can move experts, checkpoints can reshard, and an expert's backward touches only its
own gradient (a stacked [E, d, h] weight indexed per expert makes every backward
materialise a full-size gradient: O(E^2)).

The runtime swaps `dispatcher` for an expert-parallel one; the model code stays the same.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from moepipe.config import MoEConfig
from moepipe.model.layers import SwiGLU
from moepipe.model.router import Router, Routing, route
from moepipe.model.routing_stats import RoutingStats


class AttachAuxLoss(torch.autograd.Function):
    """Identity on the activation whose backward also seeds d(aux)/d(aux) = 1.

    Under pipeline parallelism only the last stage computes the loss, so an MoE layer's
    balancing losses cannot be summed into it; riding on the activation makes them reach
    backward on whichever stage holds the layer, under any schedule.
    """

    @staticmethod
    def forward(ctx, activation: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return activation

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class ExpertDispatcher(Protocol):
    def __call__(self, x: torch.Tensor, routing: Routing, experts: nn.ModuleDict) -> torch.Tensor: ...


def run_experts_sorted(x_sorted: torch.Tensor, counts: list[int], expert_ids: list[int], experts: nn.ModuleDict) -> torch.Tensor:
    """Apply expert `expert_ids[i]` to the i-th contiguous chunk of `x_sorted` (sizes `counts`)."""
    outs = [experts[str(e)](chunk) for e, chunk in zip(expert_ids, x_sorted.split(counts)) if chunk.shape[0] > 0]
    # No tokens at all: return an empty slice of the input rather than a fresh tensor, so the
    # result stays on the autograd graph. Under expert parallelism the combine all-to-all
    # must then run its backward on this rank too, or its peers wait for it forever.
    return torch.cat(outs) if outs else x_sorted[:0]


def local_dispatch(x: torch.Tensor, routing: Routing, experts: nn.ModuleDict) -> torch.Tensor:
    """Single-process dispatch: every expert is local. x [T, d] -> [T, d].

    The layer's one host read: each expert runs on its own slice, so the slice sizes must be
    known on the host (the local analogue of the expert-parallel split-size exchange). The
    kept total comes from the same read. A grouped GEMM over stacked weights would avoid it,
    at the price of copying every expert's weights each call and of different rounding.
    """
    counts = routing.kept_counts.tolist()
    kept = sum(counts)
    token_idx = routing.all_token_idx[:kept]
    y_sorted = run_experts_sorted(x[token_idx], counts, list(range(len(counts))), experts)
    return combine(x, y_sorted, routing.all_weights[:kept], token_idx)


def combine(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """Weight expert outputs (fp32: under autocast they arrive in bf16) and sum them per token,
    in the residual stream's dtype."""
    y = (y.to(torch.promote_types(y.dtype, torch.float32)) * weights.unsqueeze(-1)).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_idx, y)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, expert_ids: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.d_model = d_model
        self.router = Router(d_model, cfg.num_experts, jitter=cfg.router_jitter, use_bias=cfg.bias_update_rate > 0)
        ids = range(cfg.num_experts) if expert_ids is None else expert_ids
        self.experts = nn.ModuleDict({str(e): SwiGLU(d_model, cfg.expert_hidden) for e in ids})
        shared_hidden = (cfg.shared_expert_hidden or cfg.expert_hidden) * cfg.num_shared_experts
        # n shared experts of width h are one SwiGLU of width n*h: same function, one matmul.
        self.shared = SwiGLU(d_model, shared_hidden) if cfg.num_shared_experts > 0 else None
        self.dispatcher: ExpertDispatcher = local_dispatch
        self.stats = RoutingStats(cfg.num_experts)
        self.record_stats = True  # switched off while activation checkpointing recomputes
        self.aux_loss_scale = 1.0  # 1/microbatches: each microbatch's share of the step's loss
        # Tensor parallelism (moepipe.parallel.tensor_parallel) makes this an identity whose
        # backward sums the gradient over the TP group: every TP rank routes all tokens but
        # dispatches only its share. Shared experts take the plain input (TP-split themselves).
        self.tp_input = _identity
        # Sequence parallelism makes the input one of token_shards equal shards of the
        # microbatch; sum_over_shards sums the balancing loss's counts over them (router.route).
        self.token_shards, self.sum_over_shards = 1, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routed = self.tp_input(flat)
        routing = route(
            self.router.logits(routed),
            self.cfg.top_k,
            score_func=self.cfg.score_func,
            capacity_factor=self.cfg.capacity_factor,
            drop_policy=self.cfg.drop_policy,
            normalize_weights=self.cfg.normalize_weights,
            normalize_after_drop=self.cfg.normalize_after_drop,
            aux_loss_type=self.cfg.aux_loss_type,
            selection_bias=self.router.expert_bias,
            token_shards=self.token_shards,
            sum_shards=self.sum_over_shards,
        )
        if self.record_stats:
            self.stats.record(routing)
        out = self.dispatcher(routed, routing, self.experts)
        if self.shared is not None:
            out = out + self.shared(flat)
        out = out.reshape(shape)
        has_aux = self.cfg.aux_loss_coef > 0 or self.cfg.z_loss_coef > 0
        if has_aux and self.training and torch.is_grad_enabled():
            aux = self.cfg.aux_loss_coef * routing.aux_loss + self.cfg.z_loss_coef * routing.z_loss
            out = AttachAuxLoss.apply(out, aux * self.aux_loss_scale)
        return out

    def set_routing_skew(self, offset: torch.Tensor | None) -> None:
        """An injected [E] logit offset (workload.kind), or None; moved to the device once per step."""
        self.router.skew = None if offset is None else offset.to(self.router.weight.device)

    def attach_expert_group(self, holders: list[list[int]], ep_rank: int, ep_group, a2a: str = "flat", local_size: int = 1,
                            node_groups=None) -> None:
        """The runtime's expert parallelism: experts live on the EP ranks `holders` names. `a2a`,
        `local_size` (ranks per node) and the mesh's `node_groups` (hierarchical over several
        nodes) choose the exchange (moepipe.model.all_to_all.exchange_for). Shadows of hot
        experts are set per step on the dispatcher (`use_shadows`, by the trainer)."""
        import torch.distributed as dist

        ep = dist.get_world_size(ep_group)
        if ep > 1:
            from moepipe.model.all_to_all import exchange_for
            from moepipe.model.expert_dispatch import ExpertParallelDispatcher

            exchange = exchange_for(a2a, local_size, ep, node_groups)
            self.dispatcher = ExpertParallelDispatcher(holders, ep_rank, ep_group, self.num_experts, exchange, local_size=local_size)

    def update_expert_bias(self, load: torch.Tensor | None = None) -> None:
        """Aux-loss-free balancing step; `load` defaults to the demand counted since reset."""
        self.router.update_bias(self.stats.demand if load is None else load, self.cfg.bias_update_rate)
