"""Build this rank's pipeline-stage modules from a plan.

A stage is the model class itself with what the stage does not hold removed: other blocks,
the embedding (all but the first stage), final norm and head (all but the last), and in
every MoE block the experts other EP ranks own. Modules are created on the meta device, so
no rank ever allocates the whole model, then materialised and initialised by parameter name,
which gives every layout the weights the single-process model starts from.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

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
    model_cfg: ModelConfig, moe_cfg: MoEConfig, plan: Plan, stage: int, ep_rank: int, device: torch.device, seed: int,
    state: Optional[Mapping[str, torch.Tensor]] = None, shard: Optional[Callable[[nn.Module], None]] = None,
) -> MoETransformer:
    """Stage `stage` of `plan` as held by EP rank `ep_rank`, initialised by parameter name; or,
    with `state` (name -> tensor for every entry the stage holds, already on `device`), adopting
    those tensors without copying them: a live migration then holds one copy of the state it
    keeps instead of the old and the new stages side by side. `shard` (tensor parallelism) splits
    the pruned meta-device stage before anything is allocated."""
    if model_cfg.tie_embeddings and plan.n_stages > 1:
        raise ValueError("model.tie_embeddings=true cannot be split over pipeline stages: set it false or parallel.pp=1")
    with torch.device("meta"):
        module = MoETransformer(model_cfg, moe_cfg, seed)
    prune_to_stage(module, plan, stage, ep_rank)
    if shard is not None:
        shard(module)
    if state is None:
        module.to_empty(device=device)
        init_weights(module, seed)
        for _, moe in module.moe_layers():
            if moe.router.expert_bias is not None:
                moe.router.expert_bias.zero_()
    else:
        wanted = module.state_dict(keep_vars=True)
        missing = [n for n in wanted if n not in state]
        if missing:
            raise KeyError(f"stage {stage} needs state entries it was not given: {missing[:3]}")
        # .to() is a no-op (the same tensor) when device and dtype already match
        module.load_state_dict({n: state[n].to(device=device, dtype=t.dtype) for n, t in wanted.items()}, strict=True, assign=True)
    _reset_rotary(module, model_cfg, device)
    left = [n for n, t in module.state_dict(keep_vars=True).items() if t is not None and t.is_meta]
    if left:
        raise RuntimeError(f"stage {stage} still has unmaterialised tensors: {left[:3]}")
    return module


def _reset_rotary(module: nn.Module, cfg: ModelConfig, device: torch.device) -> None:
    """The rotary tables are non-persistent buffers (in no state dict): always recomputed."""
    cos, sin = rotary_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
    module.rope_cos, module.rope_sin = cos.to(device), sin.to(device)
