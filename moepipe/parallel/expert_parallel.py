"""Expert parallelism: token dispatch and combine with uneven all-to-alls, following a plan's
expert map (any mapping of experts to EP ranks, not only contiguous blocks).

Per MoE layer and microbatch, on every rank of the layer's EP group:
  1. counts: all-gather each rank's tokens-per-expert vector ([ep, E], a few bytes);
  2. dispatch: order this rank's surviving assignments by (owner rank, expert) and send each
     owner its slice (all_to_all_single with uneven splits);
  3. regroup what arrived from (source, expert) order into (expert, source) order, run each
     local expert on its contiguous slice, and undo the regrouping;
  4. combine: the reverse all-to-all brings results home, where they are weighted and summed.
The all-to-alls are autograd functions (the backward of one is the other, with the splits
swapped), so the backward pass moves gradients the same way without a counts exchange.
All ranks of an EP group run the same schedule, so they meet at every collective in order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moepipe.model.moe import combine, run_experts_sorted
from moepipe.model.router import Routing


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def segment_permutation(counts: torch.Tensor) -> torch.Tensor:
    """Rows laid out as segments in (row-major) order of `counts` [A, B] -> the gather index
    that lays them out in (B, A) order instead."""
    a, b = counts.shape
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat
    seg = torch.arange(a * b, device=counts.device).view(a, b).t().reshape(-1)
    seg_counts, seg_starts = flat[seg], starts[seg]
    out_starts = torch.cumsum(seg_counts, 0) - seg_counts
    total = int(seg_counts.sum())
    shift = torch.repeat_interleave(seg_starts - out_starts, seg_counts, output_size=total)
    return torch.arange(total, device=counts.device) + shift


class ExpertParallelDispatcher:
    """Replaces a MoELayer's local dispatcher: experts live on the ranks the plan says.

    `holders[e]` lists the EP ranks with a copy of expert e. A replicated expert's tokens are
    split evenly across its copies: the j-th assignment to e on source rank s goes to copy
    (j + s) mod n. Copies hold identical weights (their gradients are summed, see grad_sync),
    so the split changes where the work runs, not the result.
    """

    def __init__(self, holders: list[list[int]], ep_rank: int, group, num_experts: int):
        if len(holders) != num_experts or any(not h for h in holders):
            raise ValueError(f"expert holders must list at least one EP rank for each of {num_experts} experts")
        self.ep_rank, self.group, self.num_experts = ep_rank, group, num_experts
        self.ep = dist.get_world_size(group)
        width = max(len(h) for h in holders)
        self.n_copies = torch.tensor([len(h) for h in holders], dtype=torch.long)
        # [E, width] holder table, padded by repeating (never indexed past n_copies)
        self.table = torch.tensor([h + [h[0]] * (width - len(h)) for h in holders], dtype=torch.long)
        self.local_experts = [e for e in range(num_experts) if ep_rank in holders[e]]

    def targets(self, expert_idx: torch.Tensor, kept_counts: torch.Tensor) -> torch.Tensor:
        """EP rank each (expert-sorted) assignment is sent to."""
        dev = expert_idx.device
        table, n = self.table.to(dev), self.n_copies.to(dev)
        starts = torch.cumsum(kept_counts, 0) - kept_counts
        pos = torch.arange(expert_idx.numel(), device=dev) - starts[expert_idx]
        return table[expert_idx, (pos + self.ep_rank) % n[expert_idx]]

    def __call__(self, x: torch.Tensor, routing: Routing, experts: nn.ModuleDict) -> torch.Tensor:
        E, dev = self.num_experts, routing.expert_idx.device
        counts = routing.kept_counts.to(torch.long)
        target = self.targets(routing.expert_idx, counts)
        # 1. who sends how many tokens to which (rank, expert): [dst, E] per source
        sent = torch.zeros(self.ep * E, dtype=torch.long, device=dev).index_add_(
            0, target * E + routing.expert_idx, torch.ones_like(target)
        ).view(self.ep, E)
        gathered = [torch.empty_like(sent) for _ in range(self.ep)]
        dist.all_gather(gathered, sent, group=self.group)
        local = torch.tensor(self.local_experts, dtype=torch.long, device=dev)
        recv_counts = torch.stack(gathered)[:, self.ep_rank][:, local]  # [src, L]
        in_splits, out_splits = sent.sum(1).tolist(), recv_counts.sum(1).tolist()

        # 2. dispatch: assignments are sorted by expert; a stable sort by target keeps expert order
        order = torch.argsort(target, stable=True)
        tokens = routing.token_idx[order]
        received = all_to_all(x[tokens], out_splits, in_splits, self.group)

        # 3. local experts on contiguous slices
        perm = segment_permutation(recv_counts)
        y_by_expert = run_experts_sorted(received[perm], recv_counts.sum(0).tolist(), self.local_experts, experts)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        y_received = y_by_expert[inverse]

        # 4. combine at home
        y = all_to_all(y_received, in_splits, out_splits, self.group)
        return combine(x, y, routing.weights[order], tokens)
