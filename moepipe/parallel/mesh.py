"""The (pp, ep, dp, tp) process mesh: this rank's coordinates and its process groups.

Tensor parallelism is innermost: rank = tp_rank + tp * slot, so a TP group is tp consecutive
ranks (inside a node on GPU clusters). `slot` is the rank of moepipe.placement.plan's
(pp, ep, dp) mesh, slot = ep_rank + ep * (pp_rank + pp * dp_rank), so an EP group is a run of
adjacent slots. Plans, the placers and live migration speak slots; each TP index runs its
own copy of the (pp, ep, dp) groups (ranks with the same tp_rank), so a TP rank exchanges
tokens, gradients and migrated shards only with ranks holding the same shard.

    rank:   0   1 | 2   3 | 4   5 | 6   7        pp=2, ep=2, dp=1, tp=2
    tp:     0   1 | 0   1 | 0   1 | 0   1        [ ] one TP group (consecutive ranks)
    ep:     0     | 1     | 0     | 1            EP group: same pp, dp and tp_rank
    pp:     0             | 1                    pipeline: same ep, dp and tp_rank
 With `ranks_per_node`
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
    tp: int = 1
    tp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None  # same slot: the ranks splitting one set of weights
    tp_mesh: object = None  # a 1-D DeviceMesh over tp_group (torch.distributed.tensor), tp > 1 only

    @property
    def world_size(self) -> int:
        return self.pp * self.ep * self.dp * self.tp

    @property
    def slot(self) -> int:
        """This rank's index in the (pp, ep, dp) mesh that plans and migration address."""
        return self.rank // self.tp

    def world_rank(self, slot: int) -> int:
        """The rank holding this rank's TP shard at (pp, ep, dp) mesh index `slot`."""
        return slot * self.tp + self.tp_rank

    @property
    def data_shard(self) -> int:
        """Which of the ep*dp slices of the global batch this rank's pipeline trains on."""
        return self.dp_rank * self.ep + self.ep_rank

    @property
    def is_metrics_rank(self) -> bool:
        """First rank of the last pipeline rank: it writes the results (the loss is all-reduced
        to every rank, so this holds for V-shaped schedules too, whose last stage is on pp rank 0)."""
        return self.rank == global_rank(self.pp - 1, 0, 0, self.pp, self.ep, self.dp) * self.tp


def build_mesh(pp: int, ep: int, dp: int, ranks_per_node: int = 0, tp: int = 1) -> Mesh:
    """Create every group of the mesh. Collective: all ranks must call it, in the same order.
    `ranks_per_node` > 0: also the node groups of EP groups that span several whole nodes
    (made here, once, because every rank must create every group: the pipeline ranks hold
    different numbers of MoE layers, so attach_expert_group could not)."""
    rank = dist.get_rank()
    if dist.get_world_size() != pp * ep * dp * tp:
        raise RuntimeError(f"world size {dist.get_world_size()} != pp*ep*dp*tp = {pp * ep * dp * tp}")
    local = ranks_per_node
    spans_nodes = 1 < local < ep
    if spans_nodes and ep % local:
        raise ValueError(f"{ep} EP ranks do not split into nodes of {ranks_per_node} ranks (config validation names the fix)")
    if spans_nodes and tp > 1:
        raise ValueError("the hierarchical all-to-all's node groups assume adjacent EP ranks: not with tp > 1")
    tp_rank, slot = rank % tp, rank // tp
    pp_rank, ep_rank, dp_rank = mesh_coords(slot, pp, ep, dp)
    mine: dict[str, dist.ProcessGroup | None] = {}

    def make(name: str, members: list[int]) -> None:
        # new_group is collective over the whole world: every rank creates every group.
        # `members` are slots of the (pp, ep, dp) mesh: one group per TP index.
        for t in range(tp):
            ranks = sorted(m * tp + t for m in members)
            group = dist.new_group(ranks)
            if rank in ranks:
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
    tp_group = tp_mesh = None
    if tp > 1:
        for s in range(pp * ep * dp):
            ranks = list(range(s * tp, (s + 1) * tp))
            group = dist.new_group(ranks)
            if s == slot:
                tp_group = group
        from torch.distributed.device_mesh import DeviceMesh

        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tp_mesh = DeviceMesh.from_group(tp_group, device_type, mesh_dim_names=("tp",))
    return Mesh(rank, pp, ep, dp, pp_rank, ep_rank, dp_rank, mine["pp"], mine["ep"], mine["dp"], mine["replica"], node_groups,
                tp, tp_rank, tp_group, tp_mesh)
