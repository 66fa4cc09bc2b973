"""Alternative expert backends behind the MoE layer's interface, for baselines.

`fairscale`: its MOELayer + Top2Gate (GShard algorithm: one-hot dispatch einsums, capacity
2T/E, Gumbel-noised second choice). `tutel`: Tutel's moe_layer where `import tutel` works.
Both report routing statistics and attach their aux loss like the native layer, so the
training loop and the metrics are the same for every backend.
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
