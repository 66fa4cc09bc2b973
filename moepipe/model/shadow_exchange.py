"""The runtime half of the fast path (issue 15, item 3): shadow copies of hot experts that live
for one microbatch of one MoE layer and move no optimizer state.

Per MoE layer and microbatch, once the dispatcher has all-gathered the [ep, E] counts, every EP
rank calls the same pure decision (`placement.shadows.choose_shadows`, handed in as `ShadowPolicy`)
on the same integers, so all derive the same shadow set S = {expert: extra EP ranks} with no
further message. Then:

  forward   one all-to-all over the EP group: the home of e (its plan's first holder, which
            keeps e's parameters and AdamW state) sends e's current weights, flattened to one
            row, to each shadow rank of e. The shadow runs e on its share of e's tokens (the
            dispatcher's nearest-replica split over holders + shadows) with those rows.
  backward  the same all-to-all's backward: each shadow's weight-gradient rows travel back to
            the home and autograd adds them to the home parameters' .grad, before any gradient
            sync, clip or optimizer step. The shadow keeps nothing.

So the step is the same function of the same gradient as without shadows; only the order of
floating-point sums in an expert's weight gradient changes (the home's matmul over its tokens
plus the shadow's over its own, instead of one matmul over all).

Collective order. The exchange's backward must run at the same point on every EP rank, also on
those that neither send nor receive. `tie` makes the received rows (empty or not) an input of
the layer's local expert outputs on every rank, so their gradient arrives on every rank after
the experts' backward; the exchange is created before the token dispatch, so autograd (which
runs the ready node created last first) runs it right after the dispatch all-to-all's backward
on every rank.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moepipe.model.all_to_all import flat_all_to_all

# (counts [ep, E] host ints: kept assignments per source EP rank and expert, holders) ->
# {expert: tuple of shadow EP ranks}: identical on every rank for identical counts
ShadowPolicy = Callable[[np.ndarray, Sequence[Sequence[int]]], Mapping[int, Sequence[int]]]


def flat_weights(expert: nn.Module) -> torch.Tensor:
    """One expert's parameters as one row, in registration order (SwiGLU: w1, w3, w2)."""
    return torch.cat([p.reshape(-1) for p in expert.parameters()])


class ShadowExpert:
    """A SwiGLU expert whose weights are a received row (same arithmetic as layers.SwiGLU)."""

    def __init__(self, row: torch.Tensor, d_model: int, hidden: int):
        n = hidden * d_model
        self.w1, self.w3, self.w2 = row[:n].view(hidden, d_model), row[n : 2 * n].view(hidden, d_model), row[2 * n :].view(d_model, hidden)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


class _Tie(torch.autograd.Function):
    """Identity on `x` whose backward also gives `dep` a (zero) gradient, so the graph that made
    `dep` runs its backward on every rank (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dep: torch.Tensor) -> torch.Tensor:
        ctx.dep_shape, ctx.dep_dtype = dep.shape, dep.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_zeros(ctx.dep_shape, dtype=ctx.dep_dtype)


def tie(x: torch.Tensor, dep: torch.Tensor) -> torch.Tensor:
    return _Tie.apply(x, dep)


def home_of(holders: Sequence[Sequence[int]], e: int) -> int:
    """The copy that keeps e's parameters and optimizer state: the plan's first holder."""
    return int(holders[e][0])


def exchange_plan(shadows: Mapping[int, Sequence[int]], holders: Sequence[Sequence[int]], ep_rank: int, ep: int
                  ) -> tuple[list[int], list[int], list[int], list[int]]:
    """This rank's part of the weight exchange: (experts it sends, ordered by destination then
    expert; rows per destination; experts it receives, ordered by source then expert; rows per
    source). Every rank derives it from the same S."""
    send, in_splits = [], [0] * ep
    recv, out_splits = [], [0] * ep
    for d in range(ep):
        for e in sorted(shadows):
            if d in shadows[e] and home_of(holders, e) == ep_rank:
                send.append(e)
                in_splits[d] += 1
    for s in range(ep):
        for e in sorted(shadows):
            if ep_rank in shadows[e] and home_of(holders, e) == s:
                recv.append(e)
                out_splits[s] += 1
    return send, in_splits, recv, out_splits


def send_shadow_weights(shadows: Mapping[int, Sequence[int]], holders: Sequence[Sequence[int]], ep_rank: int, group, ep: int,
                        experts: nn.ModuleDict, d_model: int, hidden: int, like: torch.Tensor
                        ) -> tuple[torch.Tensor, dict[int, ShadowExpert]]:
    """Forward of the exchange: (the received rows [n, P], to `tie` into the layer's output;
    {expert: ShadowExpert} for the experts this rank shadows). Autograd returns the rows'
    gradients to the homes."""
    send, in_splits, recv, out_splits = exchange_plan(shadows, holders, ep_rank, ep)
    P = 3 * d_model * hidden
    if send:
        rows = torch.stack([flat_weights(experts[str(e)]) for e in send])
    else:  # nothing to send: an empty row block that still takes part in autograd
        rows = like.new_zeros((0, P)).requires_grad_(True)
    got = flat_all_to_all(rows, out_splits, in_splits, group)
    return got, {e: ShadowExpert(got[i], d_model, hidden) for i, e in enumerate(recv)}


def shadow_policy(choose: Callable, setup, slots: int) -> Optional[ShadowPolicy]:
    """`choose_shadows` bound to one layer's cost-model setup and the slot budget (None: off)."""
    if slots <= 0:
        return None

    def policy(counts: np.ndarray, holders: Sequence[Sequence[int]]) -> Mapping[int, Sequence[int]]:
        return choose(counts, holders, setup, slots).shadows

    return policy
