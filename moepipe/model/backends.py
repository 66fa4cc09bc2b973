"""Expert backends behind the MoE layer's interface: `native` (moepipe.model.moe, the engine),
`fairscale` and `tutel` (baselines, moepipe.model.fairscale_moe / tutel_moe).

Every backend's layer offers what the trainers use, so the loop, metrics, placer statistics
and pipeline code are the same for all of them:

- `stats` (RoutingStats, device-side counters), `record_stats`, `aux_loss_scale`;
- `update_expert_bias(load=None)`;
- `set_routing_skew(offset)`: an injected [E] logit offset (workload.kind), or None;
- `attach_expert_group(holders, ep_rank, ep_group, a2a, local_size)`: the runtime hands the
  layer its EP group, the plan's holders of each expert and the all-to-all to use
  (`parallel.a2a`; `local_size` = ranks per node from the topology), after the stage is built.

Each backend module also has `check_config(cfg)`, which rejects (one-line ConfigError) the
options it cannot honour; config.validate calls it before any worker starts.
"""
from __future__ import annotations

import importlib

from torch import nn

from moepipe.config import MoEConfig

BACKEND_MODULES = {"native": "moepipe.model.moe", "fairscale": "moepipe.model.fairscale_moe", "tutel": "moepipe.model.tutel_moe"}


def build_moe(d_model: int, cfg: MoEConfig) -> nn.Module:
    if cfg.backend == "fairscale":
        from moepipe.model.fairscale_moe import FairscaleMoE

        return FairscaleMoE(d_model, cfg)
    if cfg.backend == "tutel":
        from moepipe.model.tutel_moe import build_tutel_moe

        return build_tutel_moe(d_model, cfg)
    from moepipe.model.moe import MoELayer

    return MoELayer(d_model, cfg)


def check_backend_config(cfg) -> None:
    """The configured backend's own checks (fairscale/tutel import lazily: native runs never need them)."""
    name = cfg.moe.backend
    if cfg.moe.num_experts and name != "native":
        importlib.import_module(BACKEND_MODULES[name]).check_config(cfg)
