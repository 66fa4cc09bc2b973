"""Gradient averaging and the global gradient norm across the (pp, ep, dp) mesh.

Every pipeline (fixed ep, dp coordinates) trains on its own 1/(ep*dp) slice of the global
batch, so the global gradient is the mean over those S = ep*dp slices:
- dense weights are replicated on all S ranks of a stage: all-reduce over them, divide by S;
- an expert already receives the tokens of all ep slices of its data-parallel replica through
  the all-to-all, so its gradient is summed over dp replicas only, then divided by S.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moepipe.parallel.mesh import Mesh


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def split_params(modules: list[nn.Module]) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    dense, expert = [], []
    for module in modules:
        for name, p in module.named_parameters():
            (expert if is_expert_param(name) else dense).append(p)
    return dense, expert


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
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat /= divisor
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def sync_gradients(dense: list, expert: list, mesh: Mesh) -> None:
    slices = mesh.ep * mesh.dp
    fill_missing_grads(dense)
    fill_missing_grads(expert)
    _all_reduce_mean(dense, mesh.replica_group, slices)
    _all_reduce_mean(expert, mesh.dp_group, slices)


def global_grad_norm(dense: list, expert: list, mesh: Mesh) -> torch.Tensor:
    """L2 norm of the whole model's gradient, each distinct weight counted once."""
    device = (dense + expert)[0].grad.device if dense + expert else torch.device("cpu")
    counted = (dense if mesh.ep_rank == 0 and mesh.dp_rank == 0 else []) + (expert if mesh.dp_rank == 0 else [])
    sq = torch.zeros((), dtype=torch.float64, device=device)
    if counted:
        norms = torch._foreach_norm([p.grad.detach() for p in counted])  # one fused pass, fp32 like torch's clip
        sq += torch.stack(norms).double().pow(2).sum()
    dist.all_reduce(sq)
    return sq.sqrt()


def clip_gradients(params: list, total_norm: torch.Tensor, max_norm: float) -> None:
    # torch's own scaling rule (coef = max/(norm+1e-6), clamped at 1): same as the reference run
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm.float())
