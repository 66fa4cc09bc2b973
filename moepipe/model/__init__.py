"""The MoE transformer: plain modules, no torch.distributed (the runtime applies parallelism)."""
from moepipe.model.moe import AttachAuxLoss, MoELayer, RoutingStats, local_dispatch
from moepipe.model.router import Router, Routing, expert_capacity, route
from moepipe.model.transformer import Block, MoETransformer, build_model, count_parameters, lm_loss

__all__ = [
    "AttachAuxLoss", "Block", "MoELayer", "MoETransformer", "Router", "Routing", "RoutingStats",
    "build_model", "count_parameters", "expert_capacity", "lm_loss", "local_dispatch", "route",
]
