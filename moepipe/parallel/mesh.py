"""The (pp, ep, dp) process mesh: this rank's coordinates and its process groups.

Rank order follows moepipe.placement.plan: rank = ep_rank + ep * (pp_rank + pp * dp_rank),
so an EP group is a run of adjacent ranks (one node on GPU clusters). With `ranks_per_node`
(the hierarchical all-to-all: topology.devices_per_node, rank r on node r // ranks_per_node)
an EP group that spans several nodes also gets its node groups (moepipe.model.all_to_all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moepipe.model.all_to_all import NodeGroups
from moepipe.placement.plan import global_rank, mesh_coords


@dataclass
class Mesh:
    rank: int
    pp: int
    ep: int
    dp: int
    pp_rank: int
    ep_rank: int
    dp_rank: int
    pp_group: dist.ProcessGroup | None  # same (ep, dp): one pipeline
    ep_group: dist.ProcessGroup | None  # same (pp, dp): one stage's expert-parallel ranks
    dp_group: dist.ProcessGroup | None  # same (pp, ep): replicas of the same experts
    replica_group: dist.ProcessGroup | None  # same pp: all ranks holding the stage's dense weights
    # the hierarchical all-to-all's sub-groups of ep_group: None unless its EP group spans nodes
    node_groups: NodeGroups | None = None

    @property
    def world_size(self) -> int:
        return self.pp * self.ep * self.dp

    @property
    def data_shard(self) -> int:
        """Which of the ep*dp slices of the global batch this rank's pipeline trains on."""
        return self.dp_rank * self.ep + self.ep_rank

    @property
    def is_metrics_rank(self) -> bool:
        """First rank of the last pipeline rank: it writes the results (the loss is all-reduced
        to every rank, so this holds for V-shaped schedules too, whose last stage is on pp rank 0)."""
        return self.rank == global_rank(self.pp - 1, 0, 0, self.pp, self.ep, self.dp)


def build_mesh(pp: int, ep: int, dp: int, ranks_per_node: int = 0) -> Mesh:
    """Create every group of the mesh. Collective: all ranks must call it, in the same order.
    `ranks_per_node` > 0: also the node groups of EP groups that span several whole nodes
    (made here, once, because every rank must create every group: the pipeline ranks hold
    different numbers of MoE layers, so attach_expert_group could not)."""
    rank = dist.get_rank()
    if dist.get_world_size() != pp * ep * dp:
        raise RuntimeError(f"world size {dist.get_world_size()} != pp*ep*dp = {pp * ep * dp}")
    local = ranks_per_node
    spans_nodes = 1 < local < ep
    if spans_nodes and ep % local:
        raise ValueError(f"{ep} EP ranks do not split into nodes of {ranks_per_node} ranks (config validation names the fix)")
    pp_rank, ep_rank, dp_rank = mesh_coords(rank, pp, ep, dp)
    mine: dict[str, dist.ProcessGroup | None] = {}

    def make(name: str, members: list[int]) -> None:
        # new_group is collective over the whole world: every rank creates every group.
        group = dist.new_group(sorted(members))
        if rank in members:
            mine[name] = group

    for d in range(dp):
        for e in range(ep):
            make("pp", [global_rank(p, e, d, pp, ep, dp) for p in range(pp)])
    for d in range(dp):
        for p in range(pp):
            make("ep", [global_rank(p, e, d, pp, ep, dp) for e in range(ep)])
    for p in range(pp):
        for e in range(ep):
            make("dp", [global_rank(p, e, d, pp, ep, dp) for d in range(dp)])
    for p in range(pp):
        make("replica", [global_rank(p, e, d, pp, ep, dp) for d in range(dp) for e in range(ep)])
    node_groups = None
    if spans_nodes:  # EP rank e = node * local + index; adjacent ranks share a node
        nodes = ep // local
        for d in range(dp):
            for p in range(pp):
                for n in range(nodes):
                    make("intra", [global_rank(p, n * local + i, d, pp, ep, dp) for i in range(local)])
                for i in range(local):
                    make("inter", [global_rank(p, n * local + i, d, pp, ep, dp) for n in range(nodes)])
        node_groups = NodeGroups(local, nodes, ep_rank // local, ep_rank % local, mine["intra"], mine["inter"])
    return Mesh(rank, pp, ep, dp, pp_rank, ep_rank, dp_rank, mine["pp"], mine["ep"], mine["dp"], mine["replica"], node_groups)
