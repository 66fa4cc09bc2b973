"""Decoder-only MoE transformer.

Blocks live in a ModuleDict keyed by their global index, so a pipeline stage is this same
module with the blocks it does not own deleted (and without embedding or head where the
stage does not hold them): parameter names stay global and checkpoints reshard by name.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moepipe.config import ModelConfig, MoEConfig, moe_layer_ids
from moepipe.model.layers import Attention, RMSNorm, SwiGLU, rotary_tables
from moepipe.model.moe import MoELayer


def build_ffn(layer_id: int, model: ModelConfig, moe: MoEConfig) -> nn.Module:
    if layer_id not in moe_layer_ids(model, moe):
        return SwiGLU(model.d_model, model.ffn_hidden)
    from moepipe.model.backends import build_moe

    return build_moe(model.d_model, moe)


class Block(nn.Module):
    def __init__(self, layer_id: int, model: ModelConfig, moe: MoEConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(model.d_model, model.norm_eps)
        self.attn = Attention(model.d_model, model.n_heads, model.n_kv_heads or model.n_heads)
        self.ffn_norm = RMSNorm(model.d_model, model.norm_eps)
        self.ffn = build_ffn(layer_id, model, moe)

    @property
    def is_moe(self) -> bool:
        return hasattr(self.ffn, "stats")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class MoETransformer(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig, seed: int = 0):
        super().__init__()
        self.model_cfg, self.moe_cfg = model, moe
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(model.vocab_size, model.d_model)
        self.layers = nn.ModuleDict({str(i): Block(i, model, moe) for i in range(model.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(model.d_model, model.norm_eps)
        self.output: nn.Linear | None = nn.Linear(model.d_model, model.vocab_size, bias=False)
        if model.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_tables(model.d_model // model.n_heads, model.max_seq_len, model.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        init_weights(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] on a whole model; on a pipeline stage, whatever the
        stage holds: tokens or hidden states in, hidden states or logits out."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        for block in self.layers.values():
            if self.activation_checkpointing and self.training:
                h = _checkpointed(block, h, self.rope_cos, self.rope_sin)
            else:
                h = block(h, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h

    # ---- MoE bookkeeping used by the training loop and the placer

    def moe_layers(self) -> Iterator[tuple[int, nn.Module]]:
        for block in self.layers.values():
            if block.is_moe:
                yield block.layer_id, block.ffn

    def set_aux_loss_scale(self, scale: float) -> None:
        for _, moe in self.moe_layers():
            moe.aux_loss_scale = scale

    def reset_routing_stats(self) -> None:
        for _, moe in self.moe_layers():
            moe.stats.reset()

    def update_expert_bias(self) -> None:
        for _, moe in self.moe_layers():
            moe.update_expert_bias()

    def set_routing_skew(self, skew: dict[int, torch.Tensor] | None) -> None:
        """Per-layer logit offsets [E] (injected workloads); None removes them."""
        for layer_id, moe in self.moe_layers():
            moe.set_routing_skew(None if skew is None else skew.get(layer_id))


@torch.no_grad()
def init_weights(module: nn.Module, seed: int) -> None:
    """Normal(0, std) weights, residual output projections scaled by 1/sqrt(2 L) (GPT-2),
    norm gains at one. Each parameter draws from a generator seeded by (seed, its name), so
    a pipeline stage or an expert-parallel shard initialises exactly the weights the whole
    model would: every layout starts from the same point without building the full model (a
    tensor-parallel shard, a DTensor, draws the whole weight and keeps its piece)."""
    cfg = module.model_cfg
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    for name, p in module.named_parameters():
        if p.is_meta:
            continue  # materialised and initialised later (pipeline stages)
        if p.dim() == 1:
            p.fill_(1.0)
            continue
        std = out_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        value = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        if hasattr(p, "device_mesh"):  # a tensor-parallel shard (DTensor): its piece of the same init
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        p.copy_(value)


def _checkpointed(block: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Recompute `block` in backward. Routing statistics are recorded on the first pass only,
    so recomputation does not double-count tokens (the RNG state is replayed, so routing,
    jitter included, is identical)."""
    calls = [0]
    moe = block.ffn if block.is_moe else None

    def run(h: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if moe is None:
            return block(h, cos, sin)
        before = moe.record_stats
        moe.record_stats = before and calls[0] == 1
        try:
            return block(h, cos, sin)
        finally:
            moe.record_stats = before

    return checkpoint(run, h, use_reentrant=False)


def build_model(model: ModelConfig, moe: MoEConfig, seed: int = 0) -> MoETransformer:
    return MoETransformer(model, moe, seed)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (nats per token)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def count_parameters(model: MoETransformer) -> dict[str, int]:
    """Total parameters and those active per token (shared ones plus k of E experts)."""
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    cfg = model.moe_cfg
    active = total - expert
    if cfg.num_experts:
        active += expert * cfg.top_k // cfg.num_experts
    return {"total": total, "active": active, "expert": expert}
