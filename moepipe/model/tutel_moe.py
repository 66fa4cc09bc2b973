"""Tutel's moe_layer as an expert backend (a baseline), where `import tutel` works.

Reports routing statistics and attaches its aux loss like the native layer. What it cannot
honour is rejected by `check_config` before any worker starts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moepipe.config import ConfigError, MoEConfig
from moepipe.model.layers import SwiGLU
from moepipe.model.moe import AttachAuxLoss, RoutingStats


def build_tutel_moe(d_model: int, cfg: MoEConfig) -> nn.Module:
    try:
        from tutel import moe as tutel_moe  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"moe.backend=tutel but Tutel is not importable ({err}): Tutel is not on the package registries; "
            "build it from a source checkout (python -m pip install --no-build-isolation <path-to-tutel>) or use moe.backend=native"
        ) from None
    return TutelMoE(d_model, cfg)


class TutelMoE(nn.Module):
    """Tutel's layer with its built-in SwiGLU-free 'ffn' experts (GELU), top-k gate."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        from tutel import moe as tutel_moe

        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.moe = tutel_moe.moe_layer(
            gate_type={"type": "top", "k": cfg.top_k, "capacity_factor": cfg.capacity_factor},
            model_dim=d_model,
            experts={"type": "ffn", "count_per_node": cfg.num_experts, "hidden_size_per_expert": cfg.expert_hidden},
        )
        self.stats = RoutingStats(cfg.num_experts)
        self.record_stats = True
        self.aux_loss_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        l_aux = self.moe.l_aux
        if self.record_stats:
            self.stats.aux_loss_sum += float(l_aux.detach())
            self.stats.calls += 1
        if self.training and torch.is_grad_enabled() and self.cfg.aux_loss_coef > 0:
            out = AttachAuxLoss.apply(out, self.cfg.aux_loss_coef * l_aux * self.aux_loss_scale)
        return out

    def update_expert_bias(self, load=None) -> None:
        pass

    def set_routing_skew(self, offset) -> None:
        if offset is not None:
            raise NotImplementedError("injected routing skew (workload.kind) on Tutel's gate")

    def attach_expert_group(self, holders, ep_rank: int, ep_group) -> None:
        raise NotImplementedError("moe.backend=tutel under the distributed runtime")


def check_config(cfg) -> None:
    """Options moe.backend=tutel cannot honour: one-line ConfigError (called by config.validate)."""
    par = cfg.parallel
    if par.pp * par.ep * par.dp > 1:
        raise ConfigError(
            f"moe.backend=tutel runs in one process only (parallel.pp*ep*dp={par.pp * par.ep * par.dp}): "
            "use moe.backend=native for distributed runs"
        )
