"""Injected workloads for placement studies: routing skew and emulated slow devices.

Both are off by default and labelled in the config (`workload.*`), so no result can be
mistaken for natural routing or real hardware.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from moepipe.config import MoepipeConfig, moe_layer_ids


def routing_skew(cfg: MoepipeConfig, step: int, source: int | None = None) -> dict[int, torch.Tensor] | None:
    """Logit offsets log(p_e * E) per MoE layer for this step, or None when no skew is set.

    For softmax routing this multiplies each expert's prior odds by p_e * E, so a uniform
    router ends up choosing experts in proportion to the workload's distribution p. `source`:
    this rank's EP rank, for workloads whose skew depends on where tokens start (origin skew;
    None: the whole job's distribution, as one process sees it).
    """
    w = cfg.workload
    if w.kind == "none" or cfg.moe.num_experts == 0:
        return None
    from moepipe.placement.workloads import expert_distribution

    E = cfg.moe.num_experts
    out = {}
    for layer in moe_layer_ids(cfg.model, cfg.moe):
        p = expert_distribution(
            w.kind, step, layer, E, ep=cfg.parallel.ep, strength=w.strength, period=w.period, burst_every=w.burst_every, seed=w.seed,
            source=source,
        )
        out[layer] = torch.from_numpy(np.log(np.maximum(p, 1e-12) * E)).float()
    return out


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward either stamps the start of a block's backward (at the block
    output) or sleeps in proportion to the time since that stamp (at the block input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, box: dict, at_output: bool, extra: float) -> torch.Tensor:
        ctx.box, ctx.at_output, ctx.extra = box, at_output, extra
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        now = time.perf_counter()
        if ctx.at_output:
            ctx.box["bwd"] = now
        elif "bwd" in ctx.box:
            time.sleep(max(0.0, now - ctx.box["bwd"]) * ctx.extra)
        return grad, None, None, None


class SlowDevice:
    """Makes every block of `module` `1/speed` times slower by sleeping after its forward and
    its input-gradient backward for (1/speed - 1) x the measured compute time. Sleeping (not
    spinning) leaves the CPU to the other workers, as a slower device would. Weight-gradient
    passes that zero-bubble schedules run separately are not slowed (documented limit)."""

    def __init__(self, module: nn.Module, speed: float):
        if not 0 < speed <= 1:
            raise ValueError(f"emulated device speed={speed} must be in (0, 1]")
        self.extra = 1.0 / speed - 1.0
        self.handles = []
        if self.extra <= 0 or math.isclose(self.extra, 0.0):
            return
        for block in module.layers.values():
            self.handles.append(block.register_forward_pre_hook(self._pre))
            self.handles.append(block.register_forward_hook(self._post))

    def _pre(self, block: nn.Module, args: tuple):
        box = {"fwd": time.perf_counter()}
        block._slow_box = box
        x = args[0]
        if x.requires_grad:
            x = _BackwardMark.apply(x, box, False, self.extra)
        return (x,) + tuple(args[1:])

    def _post(self, block: nn.Module, args: tuple, out: torch.Tensor):
        box = block._slow_box
        time.sleep(max(0.0, time.perf_counter() - box["fwd"]) * self.extra)
        return _BackwardMark.apply(out, box, True, self.extra) if out.requires_grad else out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
