"""Expert parallelism: token dispatch and combine with uneven all-to-alls, following a plan's
expert map (any mapping of experts to EP ranks, not only contiguous blocks).

Per MoE layer and microbatch, on every rank of the layer's EP group:
  1. counts: all-gather each rank's tokens-per-expert vector ([ep, E], a few bytes);
     with shadows on (placer.shadow_slots), this step's shadow set (decided and exchanged once
     per step: moepipe.model.shadow_exchange) counts as copies after the holders;
  2. dispatch: order this rank's surviving assignments by (owner rank, expert) and send each
     owner its slice (all_to_all_single with uneven splits);
  3. regroup what arrived from (source, expert) order into (expert, source) order, run each
     local expert on its contiguous slice, and undo the regrouping;
  4. combine: the reverse all-to-all brings results home, where they are weighted and summed.
The all-to-alls (moepipe.model.all_to_all, flat or hierarchical) are autograd functions (the
backward of one is the other, with the splits swapped), so the backward pass moves gradients
the same way without a counts exchange. The runtime hands in the EP group; this module
creates no process group.
All ranks of an EP group run the same schedule, so they meet at every collective in order.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from moepipe.model.all_to_all import flat_all_to_all
from moepipe.model.moe import combine, run_experts_sorted
from moepipe.model.router import Routing
from moepipe.placement.shadows import with_shadows
from moepipe.placement.cost_model import copy_table, rule_nodes, split_over_copies

# (x, out_splits, in_splits, group, sizes) -> rows received, sizes[s][d] = rows EP rank s sends
# to d (host ints): moepipe.model.all_to_all
Exchange = Callable[[torch.Tensor, list, list, object, list], torch.Tensor]


def segment_permutation(counts: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Rows laid out as segments in (row-major) order of `counts` [A, B] -> the gather index
    that lays them out in (B, A) order instead. `total` (= counts.sum()) sizes the result on
    the host; without it, it is read back from the device."""
    a, b = counts.shape
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat
    seg = torch.arange(a * b, device=counts.device).view(a, b).t().reshape(-1)
    seg_counts, seg_starts = flat[seg], starts[seg]
    out_starts = torch.cumsum(seg_counts, 0) - seg_counts
    if total is None:
        total = int(seg_counts.sum())
    shift = torch.repeat_interleave(seg_starts - out_starts, seg_counts, output_size=total)
    return torch.arange(total, device=counts.device) + shift


class ExpertParallelDispatcher:
    """Replaces a MoELayer's local dispatcher: experts live on the ranks the plan says.

    `holders[e]` lists the EP ranks with a copy of expert e. A replicated expert's tokens go
    to the nearest copy: one on the sender's own rank, else in its own node (`local_size`
    consecutive EP ranks to a node), else spread over the copies by their load
    (moepipe.placement.cost_model.split_over_copies, the rule the simulator models). Every rank
    derives every sender's split from the all-gathered tokens per (source, expert), so no
    other exchange is needed. Copies hold identical weights (their gradients are summed, see
    grad_sync), so the split changes where the work runs, not the result.

    Per layer and microbatch the host reads the device once: after the counts all-gather, the
    group's send matrix and this rank's receive sizes per (source, local expert) in one
    transfer. The all-to-all needs them as host integers, so this read cannot be avoided;
    every other size is derived from it. Shadows add no read: their set is fixed for the step.
    """

    def __init__(self, holders: list[list[int]], ep_rank: int, group, num_experts: int, exchange: Exchange = flat_all_to_all,
                 local_size: int = 1):
        if len(holders) != num_experts or any(not h for h in holders):
            raise ValueError(f"expert holders must list at least one EP rank for each of {num_experts} experts")
        self.ep_rank, self.group, self.num_experts, self.exchange = ep_rank, group, num_experts, exchange
        self.needs_matrix = exchange is not flat_all_to_all  # the flat exchange routes by its own splits only
        self.ep = dist.get_world_size(group)
        self.holders = [list(h) for h in holders]
        self.local_size = local_size
        self.shadow_layouts: dict[tuple, _Layout] = {}  # shadow set -> its layout (a hot set recurs step after step)
        self.shadow_copies = 0  # shadow copies run (summed over calls; recomputed forwards count again)
        self.shadow_calls = 0  # calls that ran at least one shadow
        self.last_shadows: dict[int, tuple] = {}  # this step's shadow set ({} when none)
        self._shadow_experts: Optional[Callable[[], dict]] = None
        self.base_layout = _Layout(self.holders, ep_rank, self.ep, num_experts, local_size)
        self._set_layout(self.base_layout)

    def use_shadows(self, chosen: dict, shadow_experts: Optional[Callable[[], dict]] = None) -> None:
        """This step's shadow set {expert: extra EP ranks} (the same on every rank of the group)
        and, when it is not empty, a callable giving this rank's shadow experts by name
        (moepipe.model.shadow_exchange.StepShadows.experts_for). `use_shadows({})` ends the step's."""
        chosen = {int(e): tuple(int(r) for r in rs) for e, rs in chosen.items() if rs}
        self.last_shadows = chosen
        self._shadow_experts = shadow_experts if chosen else None
        self._set_layout(self._shadow_layout(chosen))

    def _set_layout(self, lay: "_Layout") -> None:
        self.layout = lay
        self.copies, self.table, self.mine, self.local_experts, self.local_idx = lay.copies, lay.table, lay.mine, lay.local_experts, lay.local_idx

    def _on(self, dev: torch.device) -> None:
        """The tables follow the tokens' device (moved on the first call only)."""
        if self.layout.table.device != dev:
            self.layout.on(dev)
            self._set_layout(self.layout)

    def _shadow_layout(self, chosen: dict) -> "_Layout":
        if not chosen:
            return self.base_layout
        key = tuple(sorted(chosen.items()))
        lay = self.shadow_layouts.get(key)
        if lay is None:
            if len(self.shadow_layouts) >= 64:  # bounded: a moving hot spot makes new sets
                self.shadow_layouts.clear()
            lay = self.shadow_layouts[key] = _Layout(with_shadows(self.holders, chosen), self.ep_rank, self.ep, self.num_experts, self.local_size)
        return lay

    def split(self, counts: torch.Tensor) -> torch.Tensor:
        """[src, E, W] assignments each source sends to each copy, from counts [src, E]."""
        self._on(counts.device)
        if self.copies.slot.shape[1] == 1:  # no replicas: every assignment goes to the one copy
            return counts.unsqueeze(2)
        return split_over_copies(counts, self.copies)

    def targets(self, expert_idx: torch.Tensor, kept_counts: torch.Tensor, my_split: torch.Tensor) -> torch.Tensor:
        """EP rank each (expert-sorted) assignment is sent to; `ep` for dropped ones (expert E).
        `my_split` [E, W]: this rank's assignments per copy; an expert's assignments fill its
        copies in holders order."""
        dev = expert_idx.device
        self._on(dev)
        starts = torch.cumsum(kept_counts, 0) - kept_counts
        starts = torch.cat([starts, starts.new_zeros(1)])  # row E: any position maps to rank ep
        pos = torch.arange(expert_idx.numel(), device=dev) - starts[expert_idx]
        bounds = torch.cat([my_split.cumsum(1), my_split.new_zeros(1, my_split.shape[1])])  # [E + 1, W]
        copy = (pos[:, None] >= bounds[expert_idx]).sum(1)
        return self.table[expert_idx, copy]

    def __call__(self, x: torch.Tensor, routing: Routing, experts: nn.ModuleDict) -> torch.Tensor:
        E, ep, dev = self.num_experts, self.ep, routing.all_expert_idx.device
        expert_idx = routing.all_expert_idx
        kept = routing.kept_counts.to(torch.long)
        # 1. every source's kept assignments per expert ([src, E]: the origins), then every
        #    source's split over the copies by the nearest-replica rule, the same on all ranks
        gathered = [torch.empty_like(kept) for _ in range(ep)]
        dist.all_gather(gathered, kept.contiguous(), group=self.group)
        counts = torch.stack(gathered)
        if self.last_shadows:  # this step's shadows (layout already set): their experts run from the received rows
            experts = {**dict(experts.items()), **self._shadow_experts()}
            self.shadow_copies += sum(map(len, self.last_shadows.values()))
            self.shadow_calls += 1
        split = self.split(counts)  # [src, E, W]
        target = self.targets(expert_idx, kept, split[self.ep_rank])
        send = torch.zeros(ep, ep, dtype=torch.long, device=dev).scatter_add_(
            1, self.copies.slot.reshape(1, -1).expand(ep, -1), split.reshape(ep, -1))  # [src, dst]
        recv_counts = (split[:, self.local_idx] * self.mine[self.local_idx]).sum(2)  # [src, L]
        # the one host read: the group's send matrix [src, dst] (what a hierarchical exchange
        # routes by; row ep_rank is this rank's send sizes) and receive sizes [src, L]
        sizes = torch.cat([send.reshape(-1), recv_counts.reshape(-1)]).tolist()
        matrix = [sizes[s * ep : (s + 1) * ep] for s in range(ep)]
        in_splits, recv = matrix[self.ep_rank], sizes[ep * ep :]
        n_local = len(self.local_experts)
        out_splits = [sum(recv[s * n_local : (s + 1) * n_local]) for s in range(ep)]
        expert_sizes = [sum(recv[s * n_local + j] for s in range(ep)) for j in range(n_local)]

        # 2. dispatch: assignments are sorted by expert; a stable sort by target keeps expert
        #    order, and puts the dropped ones (target ep) last, where the kept count cuts them off
        order = torch.argsort(target, stable=True)[: sum(in_splits)]
        tokens = routing.all_token_idx[order]
        received = self.exchange(x[tokens], out_splits, in_splits, self.group, matrix)

        # 3. local experts on contiguous slices
        perm = segment_permutation(recv_counts, sum(out_splits))
        y_by_expert = run_experts_sorted(received[perm], expert_sizes, self.local_experts, experts)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        y_received = y_by_expert[inverse]

        # 4. combine at home
        back = [list(c) for c in zip(*matrix)] if self.needs_matrix else None  # combine: the matrix transposed
        y = self.exchange(y_received, in_splits, out_splits, self.group, back)
        return combine(x, y, routing.all_weights[order], tokens)


class _Layout:
    """Where the copies of every expert are, as the dispatcher's tables: the plan's holders, or
    holders + one step's shadows (appended after the holders: the order the simulator's
    `shadowed_expert_map` and the decision's exact check use)."""

    def __init__(self, holders: list[list[int]], ep_rank: int, ep: int, num_experts: int, local_size: int):
        self.copies = copy_table(holders, rule_nodes(ep, local_size)).to(torch.as_tensor)  # host tensors, moved once
        width = self.copies.slot.shape[1]
        # [E + 1, W + 1] copy k -> EP rank. Row E stands for assignments dropped by the capacity
        # (routing gives them expert id E): their target is rank `ep`, past the group, so they
        # are counted and sent nowhere; column W is never reached by a kept assignment.
        self.table = torch.cat([torch.cat([self.copies.slot, torch.full((num_experts, 1), ep)], 1),
                                torch.full((1, width + 1), ep)])
        self.mine = self.copies.valid & (self.copies.slot == ep_rank)  # [E, W] copies on this rank
        self.local_experts = [e for e in range(num_experts) if ep_rank in holders[e]]
        self.local_idx = torch.tensor(self.local_experts, dtype=torch.long)

    def on(self, dev: torch.device) -> None:
        if self.table.device != dev:
            self.table, self.mine, self.local_idx = self.table.to(dev), self.mine.to(dev), self.local_idx.to(dev)
            self.copies = self.copies.to(lambda t: t.to(dev))
