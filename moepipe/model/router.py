"""Token routing: scores, top-k choice, capacity, and the balancing losses.

Everything here is a pure function of router logits except the `Router` module, which owns
the gate weight and the aux-loss-free selection bias. The result, `Routing`, lists the
surviving (token, expert, weight) assignments sorted by expert: that order is what both the
local expert loop and the expert-parallel all-to-all consume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """Every (token, expert, weight) assignment of T tokens, in the order the dispatchers consume.

    The arrays always hold all T*k assignments, so no shape depends on the routing (a
    data-dependent shape needs a device-to-host read, which stalls a GPU). The kept ones come
    first, sorted by expert; under a capacity the dropped ones trail with expert id E and
    weight 0. How many are kept is `kept_counts.sum()`: a dispatcher learns it with the split
    sizes it reads anyway. `token_idx`, `expert_idx` and `weights` give the kept ones alone; when
    capped they read that count back, so they are for tests and analysis, not the hot path.
    """

    all_token_idx: torch.Tensor  # [T*k] source token of each assignment, kept ones first, sorted by expert
    all_expert_idx: torch.Tensor  # [T*k] expert of each assignment (non-decreasing; E for dropped ones)
    all_weights: torch.Tensor  # [T*k] fp32 combine weight (0 for dropped ones)
    kept_counts: torch.Tensor  # [E] assignments each expert processes
    demand_counts: torch.Tensor  # [E] assignments each expert was asked for (before capacity)
    capacity: int | torch.Tensor | None  # tokens per expert, None when dropless (a device scalar for cf < 0)
    aux_loss: torch.Tensor  # scalar, load-balancing loss (without coefficient)
    z_loss: torch.Tensor  # scalar, router z-loss (without coefficient)

    @property
    def num_kept(self) -> int:
        """Host count of kept assignments (reads back when capped)."""
        return self.all_token_idx.numel() if self.capacity is None else int(self.kept_counts.sum())

    @property
    def token_idx(self) -> torch.Tensor:
        return self.all_token_idx[: self.num_kept]

    @property
    def expert_idx(self) -> torch.Tensor:
        return self.all_expert_idx[: self.num_kept]

    @property
    def weights(self) -> torch.Tensor:
        return self.all_weights[: self.num_kept]

    @property
    def num_dropped(self) -> int:
        """Host count (reads back)."""
        return int(self.demand_counts.sum() - self.kept_counts.sum())


def count_per_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bincount without its device-to-host read: CUDA's bincount reads the input's min and max
    back to size its output, this one has a fixed size. [N] long -> [num_experts] long."""
    return torch.zeros(num_experts, dtype=torch.long, device=expert_idx.device).index_add_(
        0, expert_idx, torch.ones_like(expert_idx)
    )


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, demand: torch.Tensor) -> int | torch.Tensor | None:
    """Per-expert token cap.

    cf > 0: ceil(k * cf * T / E) (Switch/GShard). cf == 0: dropless (None).
    cf < 0: the busiest expert's actual demand, but never above ceil(|cf| * k * T / E) (Tutel);
    a 0-d tensor on demand's device, so the cap is applied without reading it back.
    """
    if capacity_factor == 0:
        return None
    even_share = math.ceil(top_k * abs(capacity_factor) * num_tokens / num_experts)
    if capacity_factor > 0:
        return even_share
    return demand.max().clamp(max=even_share)


def load_balancing_loss(probs: torch.Tensor, choices: torch.Tensor, num_experts: int, top1_only: bool,
                        shards: int = 1, sum_shards: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Switch/GShard loss E * sum_e f_e * P_e: f_e the fraction of assignments to e (before
    capacity), P_e the mean router probability of e. `top1_only` counts first choices only,
    as GShard and fairscale's Top2Gate do.

    `shards` > 1: these tokens are one of `shards` equal shards of the batch (sequence
    parallelism) and `sum_shards` sums a count over them. f is then the whole batch's and P
    this shard's probability sum over the batch's token count: the shards' results sum to the
    whole batch's loss, and each one's gradient is the whole loss's w.r.t. its own tokens."""
    counted = choices[:, :1] if top1_only else choices
    counts = count_per_expert(counted.reshape(-1), num_experts)
    if shards == 1:
        f = counts.to(probs.dtype) / counted.numel()
        return num_experts * torch.sum(f * probs.mean(0))
    f = sum_shards(counts).to(probs.dtype) / (counted.numel() * shards)
    return num_experts * torch.sum(f * probs.sum(0) / (probs.shape[0] * shards))


def router_z_loss(logits: torch.Tensor, shards: int = 1) -> torch.Tensor:
    """ST-MoE's z-loss: mean squared log-partition, keeps router logits small (`shards`: this
    shard's share of the mean over `shards` equal shards)."""
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return z if shards == 1 else z / shards


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    score_func: str = "softmax",
    capacity_factor: float = 0.0,
    drop_policy: str = "position",
    normalize_weights: bool = True,
    normalize_after_drop: bool = False,
    aux_loss_type: str = "switch",
    selection_bias: torch.Tensor | None = None,
    token_shards: int = 1,
    sum_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Routing:
    """Route T tokens given fp32 logits [T, E]. `token_shards` > 1 (sequence parallelism):
    the T tokens are one of that many equal shards of the batch, `sum_shards` sums a count
    over them; the losses are this shard's share of the batch's (load_balancing_loss). Only
    dropless: a capacity counts the whole batch's assignments in token order."""
    num_tokens, num_experts = logits.shape
    if token_shards > 1 and capacity_factor != 0:
        raise ValueError("capacity-limited routing over sequence shards is not supported (config validation names the fix)")
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
    select_on = scores if selection_bias is None else scores + selection_bias
    choices = select_on.topk(top_k, dim=-1).indices  # [T, k], best first
    weights = scores.gather(-1, choices)
    if normalize_weights and top_k > 1 and not normalize_after_drop:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)

    # Flatten assignments choice-major (all first choices, then all second ...), so a stable
    # sort by expert gives first choices priority over second ones, then earlier tokens.
    expert_flat = choices.t().reshape(-1)
    token_flat = torch.arange(num_tokens, device=logits.device).repeat(top_k)
    weight_flat = weights.t().reshape(-1)
    if drop_policy == "score":  # Batch Prioritized Routing: highest router scores survive the cap
        raw = scores.gather(-1, choices).t().reshape(-1)  # before any renormalisation
        pre = torch.argsort(raw.detach(), descending=True, stable=True)
    else:
        pre = torch.arange(expert_flat.numel(), device=logits.device)
    order = pre[torch.argsort(expert_flat[pre], stable=True)]
    expert_sorted = expert_flat[order]

    demand = count_per_expert(expert_flat, num_experts)
    capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor, demand)
    if capacity is None:
        kept_counts = demand
        token_idx, expert_idx, w = token_flat[order], expert_sorted, weight_flat[order]
    else:
        starts = torch.cumsum(demand, 0) - demand
        position = torch.arange(order.numel(), device=logits.device) - starts[expert_sorted]
        keep = position < capacity
        kept_counts = demand.clamp(max=capacity)
        # Dropped assignments move behind the kept ones (expert id E) instead of being removed:
        # removing them (order[keep]) would size a tensor from device data, a host read.
        expert_key = torch.where(keep, expert_sorted, num_experts)
        by_key = torch.argsort(expert_key, stable=True)  # kept ones keep their order
        order, expert_idx, keep = order[by_key], expert_key[by_key], keep[by_key]
        token_idx = token_flat[order]
        w = torch.where(keep, weight_flat[order], 0.0)

    if normalize_weights and top_k > 1 and normalize_after_drop:
        denom = torch.zeros(num_tokens, dtype=w.dtype, device=w.device).index_add(0, token_idx, w)
        w = w / denom[token_idx].clamp_min(torch.finfo(w.dtype).eps)

    probs = scores if score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    aux = load_balancing_loss(probs, choices, num_experts, aux_loss_type == "top1", token_shards, sum_shards)
    return Routing(token_idx, expert_idx, w, kept_counts, demand, capacity, aux, router_z_loss(logits, token_shards))


class Router(nn.Module):
    """Linear gate computed in fp32, with optional input jitter and a selection-only bias."""

    def __init__(self, d_model: int, num_experts: int, jitter: float = 0.0, use_bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)  # the transformer re-initialises by name; standalone use needs a value
        self.jitter = jitter
        # Aux-loss-free balancing (DeepSeek-V3): added to scores for the choice only, never to
        # the combine weights; updated outside autograd after each optimizer step.
        self.register_buffer("expert_bias", torch.zeros(num_experts) if use_bias else None)
        # Injected routing skew (placement studies): added to the logits; not model state.
        self.skew: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # Autocast off: it would round the gate to bf16 and with it the top-k choice and losses.
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = F.linear(x, self.weight.float())
            return logits if self.skew is None else logits + self.skew

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Nudge under-loaded experts up and over-loaded ones down by `rate` (sign update)."""
        if self.expert_bias is not None:
            load = load.to(self.expert_bias.device, torch.float32)  # statistics live on the CPU
            self.expert_bias += rate * torch.sign(load.mean() - load)
