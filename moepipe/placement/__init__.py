"""Placement: topology, plan, model spec and cost model (pure python/numpy, no process groups)."""
from moepipe.placement.plan import Plan, experts_on_rank, from_json, global_rank, mesh_coords, static_plan, to_json, validate_plan
from moepipe.placement.topology import Topology, detect_topology, from_config

__all__ = [
    "Plan", "Topology", "detect_topology", "experts_on_rank", "from_config", "from_json",
    "global_rank", "mesh_coords", "static_plan", "to_json", "validate_plan",
]
