"""Build this rank's pipeline-stage modules from a plan.

A stage is the model class itself with what the stage does not hold removed: other blocks,
the embedding (all but the first stage), final norm and head (all but the last), and in
every MoE block the experts other EP ranks own. Modules are created on the meta device, so
no rank ever allocates the whole model, then materialised and initialised by parameter name,
which gives every layout the weights the single-process model starts from.
"""
from __future__ import annotations

import torch
from torch import nn

from moepipe.config import ModelConfig, MoEConfig
from moepipe.model.layers import rotary_tables
from moepipe.model.transformer import MoETransformer, init_weights
from moepipe.placement.plan import Plan


def prune_to_stage(model: MoETransformer, plan: Plan, stage: int, ep_rank: int) -> MoETransformer:
    start, end = plan.stage_layers[stage]
    for key in list(model.layers.keys()):
        if not start <= int(key) < end:
            del model.layers[key]
    if stage != 0:
        model.tok_embeddings = None
    if stage != plan.n_stages - 1:
        model.norm = None
        model.output = None
    for layer_id, moe in model.moe_layers():
        holders = plan.expert_map[layer_id]
        for key in list(moe.experts.keys()):
            if ep_rank not in holders[int(key)]:
                del moe.experts[key]
    return model


def build_stage_module(
    model_cfg: ModelConfig, moe_cfg: MoEConfig, plan: Plan, stage: int, ep_rank: int, device: torch.device, seed: int
) -> MoETransformer:
    if model_cfg.tie_embeddings and plan.n_stages > 1:
        raise ValueError("model.tie_embeddings=true cannot be split over pipeline stages: set it false or parallel.pp=1")
    with torch.device("meta"):
        module = MoETransformer(model_cfg, moe_cfg, seed)
    prune_to_stage(module, plan, stage, ep_rank)
    module.to_empty(device=device)
    init_weights(module, seed)
    _reset_buffers(module, model_cfg, device)
    return module


def _reset_buffers(module: nn.Module, cfg: ModelConfig, device: torch.device) -> None:
    """Buffers are not parameters: recompute what to_empty left uninitialised."""
    cos, sin = rotary_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    module.rope_cos, module.rope_sin = cos.to(device), sin.to(device)
    for _, moe in module.moe_layers():
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.zero_()
