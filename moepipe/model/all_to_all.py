"""All-to-all exchanges with uneven splits over an EP group, as autograd functions: the
backward of an exchange is the same exchange with the splits swapped, so gradients travel
back the way tokens came without another size exchange.

`exchange_for(parallel.a2a, ranks_per_node)` picks the one the expert dispatcher uses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


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


def flat_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """One exchange over the whole group: row block i of `x` (in_splits[i] rows) goes to rank i;
    out_splits[i] rows arrive from rank i."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_for(a2a: str, ranks_per_node: int = 1):
    """The exchange for parallel.a2a (config validation admits only the implemented ones)."""
    if a2a == "flat":
        return flat_all_to_all
    raise ValueError(f"parallel.a2a={a2a!r} has no native exchange: use flat")
