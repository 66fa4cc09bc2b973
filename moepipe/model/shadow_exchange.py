"""The runtime half of the fast path (issue 15, item 3): shadow copies of hot experts that live
for one training step and move no optimizer state.

Once per step, before the schedule runs (after any migration), every EP rank decides the same
shadow set S_l = {expert: extra EP ranks} for each of its MoE layers l, from the previous
step's per-source-rank expert counts (the trainer's all-reduced routing statistics: identical
on every rank, so no further message) with the pure decision `placement.shadows.choose_shadows`
(its rule counts the step's m microbatches against one weight broadcast and one gradient
return). Then, outside autograd:

  start of step  one all-to-all over the EP group for all of this rank's MoE layers: the home
                 of e (its plan's first holder, which keeps e's parameters and AdamW state)
                 sends e's weights, flattened to one row, to each shadow rank of e. The rows a
                 rank receives are one leaf tensor with requires_grad; every microbatch (and a
                 recomputed forward under activation checkpointing) runs the shadow expert on
                 its share of e's tokens (the dispatcher's nearest-replica split over holders +
                 shadows) from views of that leaf, so the leaf's .grad sums the step's
                 gradients of all of them.
  end of step    after the schedule's last backward, before gradient sync, clip and AdamW: one
                 all-to-all returns the leaf's gradient rows to the homes, which add them to
                 their parameters' .grad. The shadow keeps nothing.

So the step is the same function of the same gradient as without shadows; only the order of
floating-point sums in an expert's weight gradient changes (the home's matmuls over its tokens
plus the shadow's over its own, instead of one matmul over all).

Collective order: both all-to-alls run at fixed points of the step on every rank of the EP
group (they hold the same stages, so the same layers, and derive the same S); a rank with
nothing to send or receive still joins; a step where S is empty for every layer runs neither
on any rank. Nothing runs inside the schedule, so the per-microbatch cost is the dispatcher's
own (its copy tables are cached per shadow set).
"""
from __future__ import annotations

import hashlib

from typing import Callable, Hashable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# (counts [ep, E] host numbers: assignments per source EP rank and expert, holders) ->
# {expert: tuple of shadow EP ranks}: identical on every rank for identical counts
ShadowPolicy = Callable[[np.ndarray, Sequence[Sequence[int]]], Mapping[int, Sequence[int]]]


def flat_weights(expert: nn.Module) -> torch.Tensor:
    """One expert's parameters as one row, in registration order (SwiGLU: w1, w3, w2)."""
    return torch.cat([p.detach().reshape(-1) for p in expert.parameters()])


class ShadowExpert:
    """A SwiGLU expert whose weights are a received row (same arithmetic as layers.SwiGLU).
    `on_call` runs when it computes (the step records that the shadow ran)."""

    def __init__(self, row: torch.Tensor, d_model: int, hidden: int, on_call: Optional[Callable[[], None]] = None):
        n = hidden * d_model
        self.w1, self.w3, self.w2 = row[:n].view(hidden, d_model), row[n : 2 * n].view(hidden, d_model), row[2 * n :].view(d_model, hidden)
        self.on_call = on_call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_call is not None:
            self.on_call()
        return F.linear(F.silu(F.linear(x, self.w1)) * F.linear(x, self.w3), self.w2)


def home_of(holders: Sequence[Sequence[int]], e: int) -> int:
    """The copy that keeps e's parameters and optimizer state: the plan's first holder."""
    return int(holders[e][0])


def shadow_digest(chosen: Mapping[Hashable, Mapping[int, Sequence[int]]]) -> int:
    """A 62-bit digest of every layer's shadow set, independent of dict order: ranks that decided
    alike get the same number (the trainer compares them before any exchange)."""
    canon = sorted((repr(layer), sorted((int(e), tuple(sorted(int(r) for r in rs))) for e, rs in sets.items() if rs))
                   for layer, sets in chosen.items())
    return int.from_bytes(hashlib.blake2b(repr(canon).encode(), digest_size=8).digest(), "little") >> 2


def exchange_plan(shadows: Mapping[Hashable, Sequence[int]], homes: Mapping[Hashable, int], ep_rank: int, ep: int
                  ) -> tuple[list, list[int], list, list[int]]:
    """This rank's part of the weight exchange for shadowed items (keys such as (layer, expert),
    sortable) with their shadow ranks and homes: (items it sends, ordered by destination then
    key; rows per destination; items it receives, ordered by source then key; rows per source).
    Every rank derives it from the same S."""
    keys = sorted(shadows)
    send, in_splits = [], [0] * ep
    recv, out_splits = [], [0] * ep
    for d in range(ep):
        for k in keys:
            if d in shadows[k] and homes[k] == ep_rank:
                send.append(k)
                in_splits[d] += 1
    for s in range(ep):
        for k in keys:
            if ep_rank in shadows[k] and homes[k] == s:
                recv.append(k)
                out_splits[s] += 1
    return send, in_splits, recv, out_splits


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class StepShadows:
    """One step's shadows on this rank, for all its MoE layers: the weight exchange (made at
    construction), the shadow experts the dispatchers run, and the gradient return
    (`return_grads`, once after the last backward).

    chosen[layer] = {expert: shadow EP ranks} (the same on every rank of the EP group),
    holders[layer] = the plan's holders, experts[layer] = this rank's expert modules."""

    def __init__(self, chosen: Mapping[int, Mapping[int, Sequence[int]]], holders: Mapping[int, Sequence[Sequence[int]]],
                 ep_rank: int, group, ep: int, experts: Mapping[int, nn.ModuleDict], d_model: int, hidden: int, like: torch.Tensor):
        self.group, self.d_model, self.hidden = group, d_model, hidden
        flat = {(l, e): tuple(rs) for l, s in chosen.items() for e, rs in s.items() if rs}
        homes = {(l, e): home_of(holders[l], e) for l, e in flat}
        self.send, self.in_splits, self.recv, self.out_splits = exchange_plan(flat, homes, ep_rank, ep)
        self.experts = experts
        P = 3 * d_model * hidden
        with torch.no_grad():
            rows = torch.stack([flat_weights(experts[l][str(e)]) for l, e in self.send]) if self.send else like.new_empty((0, P))
            self.rows = _all_to_all(rows, self.out_splits, self.in_splits, group).requires_grad_(True)
        self.index = {k: i for i, k in enumerate(self.recv)}
        self.used = [False] * len(self.recv)  # a shadow that computed nothing returns no gradient

    def experts_for(self, layer: int) -> dict[str, ShadowExpert]:
        """This rank's shadow experts of `layer` (fresh views of the received leaf each call)."""
        out = {}
        for (l, e), i in self.index.items():
            if l == layer:
                out[str(e)] = ShadowExpert(self.rows[i], self.d_model, self.hidden, on_call=lambda i=i: self.used.__setitem__(i, True))
        return out

    def return_grads(self) -> None:
        """Shadows -> homes: each received row's gradient (and whether the shadow ran) goes back
        to the home, which adds it to its parameters' .grad. Outside autograd."""
        with torch.no_grad():
            g = self.rows.grad if self.rows.grad is not None else torch.zeros_like(self.rows)
            flags = torch.tensor(self.used, dtype=g.dtype, device=g.device).unsqueeze(1)
            back = _all_to_all(torch.cat([g, flags], 1), self.in_splits, self.out_splits, self.group)
            ran = back[:, -1].tolist()
            for (l, e), row, r in zip(self.send, back, ran):
                if r == 0:  # the shadow computed nothing: the run without it has no gradient there either
                    continue
                start = 0
                for p in self.experts[l][str(e)].parameters():
                    part = row[start : start + p.numel()].view_as(p)
                    start += p.numel()
                    if p.grad is None:
                        p.grad = part.to(p.dtype).clone()
                    else:
                        p.grad.add_(part)
        self.rows = None


def shadow_policy(choose: Callable, setup, slots: int, exact: bool = False) -> Optional[ShadowPolicy]:
    """`choose_shadows` bound to one layer's cost-model setup and the slot budget (None: off).
    The runtime trusts the greedy's own estimate (exact=False, ~0.2 ms per layer at E=8): the
    exact re-check costs ~1.3 ms per layer per step and agreed with it on the loads measured."""
    if slots <= 0:
        return None

    def policy(counts: np.ndarray, holders: Sequence[Sequence[int]]) -> Mapping[int, Sequence[int]]:
        return choose(counts, holders, setup, slots, exact=exact).shadows

    return policy
