"""fairscale's MOELayer + Top2Gate as an expert backend (a baseline: GShard algorithm, one-hot
dispatch einsums, capacity 2T/E, Gumbel-noised second choice).

Reports routing statistics and attaches its aux loss like the native layer, so the training
loop and the metrics are the same for every backend. What it cannot honour is rejected by
`check_config` before any worker starts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moepipe.config import ConfigError, MoEConfig
from moepipe.model.layers import SwiGLU
from moepipe.model.moe import AttachAuxLoss, RoutingStats


def ensure_process_group() -> None:
    """fairscale's MOELayer asks its group for a world size: give one-process runs a group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class _CountingGate(nn.Module):
    """Wraps fairscale's Top2Gate to read kept assignments per expert from its dispatch mask."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate
        self.last_kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor):
        l_aux, combine, dispatch = self.gate(x)
        self.last_kept = dispatch.detach().sum(dim=(0, 2)).long().cpu()
        return l_aux, combine, dispatch


class FairscaleMoE(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        from fairscale.nn.moe import MOELayer, Top2Gate

        ensure_process_group()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.gate = _CountingGate(Top2Gate(d_model, cfg.num_experts))
        self.moe = MOELayer(self.gate, nn.ModuleList(SwiGLU(d_model, cfg.expert_hidden) for _ in range(cfg.num_experts)))
        self.stats = RoutingStats(cfg.num_experts)
        self.record_stats = True
        self.aux_loss_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # [tokens, 1, d]: MOELayer asserts its first dim divides by the expert count
        out = self.moe(x.reshape(-1, 1, shape[-1]))
        # fairscale's l_aux is mean_e(me*ce) = sum_e(f_e P_e)/E; scale it to the native
        # E*sum_e(f_e P_e) so moe.aux_loss_coef means the same for every backend.
        l_aux = self.moe.l_aux * self.num_experts**2
        if self.record_stats:
            # fairscale keeps its pre-capacity choices to itself (the second one is Gumbel-noised),
            # so per-expert demand is what it kept; the dropped total is still exact (2 per token).
            kept = self.gate.last_kept
            self.stats.kept += kept
            self.stats.demand += kept
            self.stats.asked += 2 * (x.numel() // shape[-1])
            self.stats.aux_loss_sum += float(l_aux.detach())
            self.stats.calls += 1
        out = out.reshape(shape)
        if self.training and torch.is_grad_enabled() and self.cfg.aux_loss_coef > 0:
            out = AttachAuxLoss.apply(out, self.cfg.aux_loss_coef * l_aux * self.aux_loss_scale)
        return out

    def update_expert_bias(self, load=None) -> None:  # the fairscale gate has no selection bias
        pass

    def set_routing_skew(self, offset) -> None:
        if offset is not None:
            raise NotImplementedError("injected routing skew (workload.kind) on the fairscale gate")

    def attach_expert_group(self, holders, ep_rank: int, ep_group) -> None:
        raise NotImplementedError("moe.backend=fairscale under the distributed runtime")


def check_config(cfg) -> None:
    """Options moe.backend=fairscale cannot honour: one-line ConfigError (called by config.validate)."""
    e, par = cfg.moe, cfg.parallel
    if e.top_k != 2 or e.score_func != "softmax":
        raise ConfigError(
            f"moe.backend=fairscale supports only top-2 softmax gating (got top_k={e.top_k}, score_func={e.score_func}): "
            "set moe.top_k=2 moe.score_func=softmax or use moe.backend=native"
        )
    if e.capacity_factor != 1.0:
        raise ConfigError(
            f"moe.capacity_factor={e.capacity_factor} but fairscale's Top2Gate always caps at 2T/E: "
            "set moe.capacity_factor=1.0 with moe.backend=fairscale (or use moe.backend=native)"
        )
    if e.bias_update_rate > 0 or e.router_jitter > 0:
        raise ConfigError(
            "moe.bias_update_rate/router_jitter are not supported by moe.backend=fairscale: set them to 0 or use moe.backend=native"
        )
    if par.pp * par.ep * par.dp > 1:
        raise ConfigError(
            f"moe.backend=fairscale runs in one process only (parallel.pp*ep*dp={par.pp * par.ep * par.dp}): "
            "use moe.backend=native for distributed runs"
        )
