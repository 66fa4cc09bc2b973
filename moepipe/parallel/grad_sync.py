"""Gradient averaging and the global gradient norm across the (pp, ep, dp) mesh.

Every pipeline (fixed ep, dp coordinates) trains on its own 1/(ep*dp) slice of the global
batch, so the global gradient is the mean over those S = ep*dp slices:
- dense weights are replicated on all S ranks of a stage: all-reduce over them, divide by S;
- an expert already receives the tokens of all ep slices of its data-parallel replica through
  the all-to-all, so its gradient is summed over dp replicas only, then divided by S.
Under tensor parallelism (moepipe.parallel.tensor_parallel) every group above holds ranks of
one TP index and the gradients are local shards; the router's and the routed experts'
gradients are first summed over the TP group (each TP rank dispatched a share of the tokens);
under sequence parallelism so are the norms' (each saw one sequence shard).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moepipe.parallel.mesh import Mesh
from moepipe.parallel.tensor_parallel import is_sharded, local, match_grad_layouts, tp_partial, with_local_grads
from moepipe.placement.plan import global_rank


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def split_params(modules: list[nn.Module]) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    dense, expert = [], []
    for module in modules:
        for name, p in module.named_parameters():
            (expert if is_expert_param(name) else dense).append(p)
    return dense, expert


def tp_partial_params(modules: list[nn.Module], sp: bool = False) -> list[torch.nn.Parameter]:
    """Parameters whose gradient is summed over the TP group (router, routed experts; under
    sequence parallelism every replicated one)."""
    return [p for module in modules for name, p in module.named_parameters() if tp_partial(name, sp) and not is_sharded(p)]


def fill_missing_grads(params: list[torch.nn.Parameter]) -> None:
    """An expert that saw no token has no gradient; give it zeros so every replica and the
    single-process reference take the same optimizer step (decay and moments included)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _all_reduce_mean(params: list[torch.nn.Parameter], group, divisor: int) -> None:
    alone = group is None or dist.get_world_size(group) == 1
    if not params or (alone and divisor == 1):
        return  # nothing to average (e.g. pp-only runs): skip the flatten/copy round trip
    grads = [local(p.grad) for p in params]  # DTensor gradients: this TP rank's shard
    flat = torch.cat([g.reshape(-1) for g in grads])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat /= divisor
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def sync_gradients(dense: list, expert: list, mesh: Mesh, tp_summed: list = ()) -> None:
    slices = mesh.ep * mesh.dp
    match_grad_layouts(dense)
    fill_missing_grads(dense)
    fill_missing_grads(expert)
    if getattr(mesh, "tp", 1) > 1:
        _all_reduce_mean(list(tp_summed), mesh.tp_group, 1)  # a sum: each TP rank saw its share of the tokens
    _all_reduce_mean(dense, mesh.replica_group, slices)
    _all_reduce_mean(expert, mesh.dp_group, slices)


def global_grad_norm(dense: list, expert: list, mesh: Mesh) -> torch.Tensor:
    """L2 norm of the whole model's gradient, each distinct weight counted once (a TP-sharded
    weight once per shard, a TP-replicated one on TP rank 0 only)."""
    device = (dense + expert)[0].grad.device if dense + expert else torch.device("cpu")
    first_tp = getattr(mesh, "tp_rank", 0) == 0
    counted = ([p for p in dense if first_tp or is_sharded(p)] if mesh.ep_rank == 0 and mesh.dp_rank == 0 else [])
    counted += expert if mesh.dp_rank == 0 and first_tp else []
    sq = torch.zeros((), dtype=torch.float64, device=device)
    if counted:
        norms = torch._foreach_norm([local(p.grad).detach() for p in counted])  # one fused pass, fp32 like torch's clip
        sq += torch.stack(norms).double().pow(2).sum()
    dist.all_reduce(sq)
    return sq.sqrt()


def clip_gradients(params: list, total_norm: torch.Tensor, max_norm: float) -> None:
    # torch's own scaling rule (coef = max/(norm+1e-6), clamped at 1): same as the reference run
    # (on the local gradients: torch's foreach kernels take no list mixing DTensors and tensors)
    torch.nn.utils.clip_grads_with_norm_(with_local_grads(params), max_norm, total_norm.float())


class ExpertReplicas:
    """Experts the plan gives several EP ranks (replicas of hot experts).

    Each copy saw only its share of the expert's tokens, so the expert's gradient is the sum
    over copies: one all-reduce over the EP group of a buffer with a slot per replicated
    expert (ranks without a copy add zeros). Every rank of the EP group holds the same
    layers, so all build the same slot list. For the global norm only the first listed copy
    counts (`primary_only`).
    """

    def __init__(self, modules: list[nn.Module], expert_map: dict[int, list[list[int]]], ep_rank: int, group, device: torch.device):
        self.group, self.device, self.slots, self.secondary = group, device, [], set()
        for module in modules:
            for layer_id, moe in module.moe_layers():
                held = {int(k): list(e.parameters()) for k, e in moe.experts.items()}
                template = [p.numel() for p in next(iter(held.values()))] if held else []
                for e, ranks in enumerate(expert_map[layer_id]):
                    if len(ranks) < 2:
                        continue
                    params = held.get(e)
                    self.slots.append((sum(template), params))
                    if params is not None and ranks[0] != ep_rank:
                        self.secondary.update(id(p) for p in params)

    def __bool__(self) -> bool:
        return bool(self.slots)

    def sync(self) -> None:
        if not self.slots:
            return
        parts = []
        for size, params in self.slots:
            if params is None:
                parts.append(torch.zeros(size, device=self.device))
            else:
                parts.extend(p.grad.reshape(-1) for p in params)
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for size, params in self.slots:
            if params is not None:
                for p in params:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                    offset += p.numel()
            else:
                offset += size

    def primary_only(self, expert: list[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in expert if id(p) not in self.secondary]


def mirror_groups(mesh: Mesh) -> dist.ProcessGroup | None:
    """Chimera's replica groups: pp ranks r and pp-1-r (same EP and DP rank) hold the same two
    stages, one per model replica; under TP one group per TP index (the two ranks hold the
    same shards). Collective: every rank creates every group; returns this rank's (None when
    pp is 1)."""
    mine = None
    for d in range(mesh.dp):
        for e in range(mesh.ep):
            for p in range(mesh.pp // 2):
                slots = sorted({global_rank(p, e, d, mesh.pp, mesh.ep, mesh.dp), global_rank(mesh.pp - 1 - p, e, d, mesh.pp, mesh.ep, mesh.dp)})
                for t in range(mesh.tp):
                    members = [s * mesh.tp + t for s in slots]
                    group = dist.new_group(members)
                    if mesh.rank in members:
                        mine = group
    return mine


class MirrorReduce:
    """The gradient all-reduce between the two replicas of each stage (Chimera): each copy saw
    half of the microbatches, so the stage's gradient is their sum. A rank holds one stage of
    each replica and its mirror rank the other copies of the same two stages, so one
    all-reduce per step covers both, in plan-stage order on both sides. `stage_done(s)` (the
    executor's REDUCE_GRAD) starts it asynchronously once every stage of this rank is
    complete, overlapping the schedule's tail; `wait()` before the optimizer reads the gradients."""

    def __init__(self, modules: dict[int, nn.Module], n_stages: int, group):
        self.group, self.n_stages = group, n_stages
        # plan-stage order, then parameter order: identical on the two ranks of the group
        self.params = [p for _, mod in sorted(modules.items(), key=lambda kv: kv[0] % n_stages) for p in mod.parameters()]
        self.stages, self.done = set(modules), set()
        self._work = self._flat = None

    def stage_done(self, stage: int) -> None:
        self.done.add(stage)
        if self.done == self.stages:
            fill_missing_grads(self.params)
            # TP-sharded weights: the local shards (the mirror rank holds the same TP index's)
            self._flat = torch.cat([local(p.grad).reshape(-1) for p in self.params])
            self._work = dist.all_reduce(self._flat, group=self.group, async_op=True)

    def wait(self) -> None:
        if self._work is None:
            raise RuntimeError(f"the replicas' gradient all-reduce never started: stages {sorted(self.stages - self.done)} reported no REDUCE_GRAD")
        self._work.wait()
        offset = 0
        for p in self.params:
            g = local(p.grad)
            g.copy_(self._flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        self._work = self._flat = None
        self.done = set()
