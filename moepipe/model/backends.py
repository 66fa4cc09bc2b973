"""Expert backends behind the MoE layer's interface: `native` (moepipe.model.moe, the engine),
`fairscale` and `tutel` (baselines, moepipe.model.fairscale_moe / tutel_moe).

Every backend's layer offers what the trainers use, so the loop, metrics, placer statistics
and pipeline code are the same for all of them:

- `stats` (RoutingStats, device-side counters), `record_stats`, `aux_loss_scale`;
- `update_expert_bias(load=None)`;
- `set_routing_skew(offset)`: an injected [E] logit offset (workload.kind), or None;
- `attach_expert_group(holders, ep_rank, ep_group, a2a, local_size, node_groups)`: the runtime
  hands the layer its EP group, the plan's holders of each expert and the all-to-all to use
  (`parallel.a2a`; `local_size` = ranks per node from the topology; `node_groups` = the
  mesh's intra-/inter-node sub-groups of the EP group, `moepipe.model.all_to_all.NodeGroups`,
  or None when the EP group does not span several nodes), after the stage is built. Groups
  are made by the mesh, collectively, never here: pipeline ranks hold different numbers of
  MoE layers. A backend with its own exchange (tutel's 2DH) may ignore `node_groups`.

Each backend also has `check_config(cfg)`, which rejects (one-line ConfigError) the options it
cannot honour; config.validate calls it before any worker starts. `moe.backend` is looked up in
the plug-in registry (moepipe.plugins), so a user's package can add a backend: an object with
`build(d_model, cfg)` and `check_config(cfg)` whose layer offers the interface above.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from moepipe.config import MoEConfig


def _no_check(cfg) -> None:
    """The native layer honours every option config.validate accepts."""


@dataclass(frozen=True)
class Backend:
    """A backend plug-in: the layer builder and its config check (moepipe.plugins.interfaces)."""

    build: Callable[[int, MoEConfig], nn.Module]
    check_config: Callable[[object], None] = _no_check


def _lazy_check(module: str) -> Callable[[object], None]:
    # fairscale/tutel import only when their own backend is configured: native runs never need them
    return lambda cfg: importlib.import_module(module).check_config(cfg)


def _native(d_model: int, cfg: MoEConfig) -> nn.Module:
    from moepipe.model.moe import MoELayer

    return MoELayer(d_model, cfg)


def _fairscale(d_model: int, cfg: MoEConfig) -> nn.Module:
    from moepipe.model.fairscale_moe import FairscaleMoE

    return FairscaleMoE(d_model, cfg)


def _tutel(d_model: int, cfg: MoEConfig) -> nn.Module:
    from moepipe.model.tutel_moe import build_tutel_moe

    return build_tutel_moe(d_model, cfg)


native = Backend(_native)
fairscale = Backend(_fairscale, _lazy_check("moepipe.model.fairscale_moe"))
tutel = Backend(_tutel, _lazy_check("moepipe.model.tutel_moe"))


def _backend(name: str):
    from moepipe.plugins.registry import resolve

    return resolve("moe_backend", name)


def build_moe(d_model: int, cfg: MoEConfig) -> nn.Module:
    return _backend(cfg.backend).build(d_model, cfg)

