"""Lean weight gradients for split backwards (I then W) in moepipe's executor.

torch's PipelineStage runs `I` as an input-only backward and keeps the microbatch's whole
autograd graph until `W`. Here `I` is an ordinary full backward in which the stage's
nn.Linear layers compute with a detached weight: autograd neither saves anything for their
weight gradient nor computes it, so the graph is freed at I. What W needs is kept outside the
graph: per Linear call the input x (recorded in the forward) and the output gradient dy
(a tensor hook, fired in I). W then adds dW = dy^T x per Linear. Every other parameter
(norms, router, embedding) gets its gradient in I as usual.

Memory between I and W: sum over a stage's Linear calls of x + dy (inputs shared by several
Linears, e.g. wq/wk/wv, are one storage), instead of the whole graph.

Activation checkpointing: the trainer turns lean W off (x kept from the forward to W would
undo the checkpointing). Should a recompute run here anyway, it uses the same detached-weight
op (the step is `active`) without recording again, so the saved tensors still match.

A Linear whose weight is a DTensor (tensor parallelism) or whose input needs no gradient runs
as usual (its weight gradient is computed in I).
"""
from __future__ import annotations

import types
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()


def _identity(t):
    return t


class LeanWeightGrad:
    """Patches the plain nn.Linear layers of `module`; `begin_forward(mb)` / `end_forward()`
    bracket a microbatch's forward, `runner(mb)` (after its backward) returns its W."""

    def __init__(self, module: nn.Module):
        self.linears = [m for m in module.modules() if type(m) is nn.Linear and not isinstance(m.weight, DTensor)]
        self.active = False  # a training step with split backwards runs
        self.mb: Optional[int] = None  # the microbatch whose forward runs
        self.bwd_mb: Optional[int] = None  # the microbatch whose backward runs
        self.records: dict[int, list] = {}  # mb -> [[linear, x, dy], ...] in forward order
        self.pack: Callable = _identity  # how a kept tensor is stored (a memory probe may count it)
        self.unpack: Callable = _identity
        for lin in self.linears:  # bound to the Linear: a deep copy of the module computes with its own weights
            lin.forward = types.MethodType(self._patched(), lin)

    def _patched(self):
        def forward(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            if not (self.active and torch.is_grad_enabled() and x.requires_grad and lin.weight.requires_grad):
                return F.linear(x, lin.weight, lin.bias)
            y = F.linear(x, lin.weight.detach(), lin.bias)
            if self.mb is None:  # activation checkpointing's recompute: the forward already recorded
                return y
            rec = [lin, self.pack(x.detach()), None]
            self.records.setdefault(self.mb, []).append(rec)

            def keep(g: torch.Tensor) -> None:
                rec[2] = self.pack(g)
            y.register_hook(keep)
            return y
        return forward

    def clear(self) -> None:
        self.records.clear()

    def runner(self, mb: int) -> Callable[[], None]:
        """W of microbatch `mb`: its Linear weight gradients, accumulated into `.grad`."""
        recs = self.records.pop(mb, [])
        return lambda: self._weight_grads(recs)

    def _weight_grads(self, recs: list) -> None:
        # Per weight, its calls' contributions summed first (backward order: reverse of the
        # forward), then added to .grad once, as autograd's AccumulateGrad does.
        total: dict[int, list] = {}
        for rec in reversed(recs):
            lin, x, dy = rec
            rec[1] = rec[2] = None  # the hook on y still references rec while the graph's nodes live
            if dy is None:  # the output did not reach the loss
                continue
            x, dy = self.unpack(x), self.unpack(dy)
            x2 = x.reshape(-1, x.shape[-1]).to(dy.dtype)
            dy2 = dy.reshape(-1, dy.shape[-1])
            g = x2.t().mm(dy2).t()  # as mm's backward forms the gradient of weight.t()
            g = g.to(lin.weight.dtype)
            slot = total.get(id(lin))
            if slot is None:
                total[id(lin)] = [lin.weight, g]
            else:
                slot[1] = slot[1] + g
        recs.clear()
        with torch.no_grad():
            for w, g in total.values():
                if w.grad is None:
                    w.grad = g.contiguous()
                else:
                    w.grad += g


__all__ = ["LeanWeightGrad"]
