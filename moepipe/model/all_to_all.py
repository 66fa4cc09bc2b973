"""All-to-all exchanges with uneven splits over an EP group, as autograd functions: the
backward of an exchange is the same exchange with the splits swapped, so gradients travel
back the way tokens came without another size exchange.

An exchange is called as `exchange(x, out_splits, in_splits, group, sizes)`: row block d of
`x` (in_splits[d] rows) goes to EP rank d, out_splits[s] rows arrive from EP rank s, in source
order; `sizes[s][d]` (host ints, the whole EP group's send matrix, which the dispatcher derives
from the counts it already gathered) is what the hierarchical exchange needs to route other
ranks' rows. `exchange_for(parallel.a2a, local_size, ep_size, node_groups)` picks one.

- flat: one all_to_all_single over the EP group (P - 1 peers per rank).
- hierarchical (Tutel's 2DH order): EP rank r = n * L + l (node n of N, local index l of L).
  Phase 1, inside the node: every rank hands local peer l' all its rows for ranks (*, l').
  Phase 2, across nodes among ranks with the same local index: rank (n, l') sends node n'
  the rows for (n', l') from all of node n. Peers per rank: (L - 1) + (N - 1). Each rank
  lays its buffer out so that what arrives last is already in source order (n, l), so the
  result is the flat exchange's, bit for bit (rows are only copied).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _a2a(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def flat_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, sizes=None) -> torch.Tensor:
    """One exchange over the whole group: row block i of `x` (in_splits[i] rows) goes to rank i;
    out_splits[i] rows arrive from rank i. `sizes` (the group's send matrix) is not needed."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass(frozen=True)
class NodeGroups:
    """This rank's two sub-groups of its EP group for the hierarchical exchange. The runtime's
    mesh (moepipe.parallel.mesh.build_mesh) creates them collectively; this module creates none.
    EP rank = node * local_size + local; group ranks follow EP rank order."""

    local_size: int  # L: EP ranks per node
    nodes: int  # N: nodes the EP group spans
    node: int  # this rank's node index within the EP group (its rank in `inter`)
    local: int  # this rank's index within its node (its rank in `intra`)
    intra: object  # the L ranks of this node
    inter: object  # the N ranks with this local index, one per node


def _two_phase(x: torch.Tensor, sizes: list[list[int]], g: NodeGroups) -> torch.Tensor:
    """The hierarchical exchange of `x` (this rank's rows in destination order) under the send
    matrix `sizes`; returns the rows this rank receives, in source order."""
    L, N, n, l = g.local_size, g.nodes, g.node, g.local
    me = n * L + l
    row = sizes[me]
    # phase 1: regroup by destination's local index l' (then node n'), send to local peer l'
    out_seg = torch.split(x, row)  # host sizes: views, no device read
    buf1 = torch.cat([out_seg[m * L + lp] for lp in range(L) for m in range(N)])
    send1 = [sum(row[m * L + lp] for m in range(N)) for lp in range(L)]
    # what node-mate (n, j) holds for ranks (*, l): sizes[n*L + j][m*L + l], m = 0..N-1
    got = [[sizes[n * L + j][m * L + l] for m in range(N)] for j in range(L)]
    mid = _a2a(buf1, [sum(r) for r in got], send1, g.intra)
    # arrived as (j, m): regroup as (m, j) so each destination node's block is in source order
    mid_seg = torch.split(mid, [c for r in got for c in r])
    buf2 = torch.cat([mid_seg[j * N + m] for m in range(N) for j in range(L)])
    send2 = [sum(got[j][m] for j in range(L)) for m in range(N)]
    # phase 2 among ranks (*, l): node m's block holds its ranks' rows for me, (m, j) order
    recv2 = [sum(sizes[m * L + j][me] for j in range(L)) for m in range(N)]
    return _a2a(buf2, recv2, send2, g.inter)


class _Hierarchical(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[list[int]], groups: NodeGroups) -> torch.Tensor:
        ctx.sizes, ctx.groups = sizes, groups
        return _two_phase(x, sizes, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # the same exchange with the send matrix transposed: gradients go back the way rows came
        back = [list(col) for col in zip(*ctx.sizes)]
        return _two_phase(grad, back, ctx.groups), None, None


class HierarchicalAllToAll:
    """The 2DH exchange over `groups` (an exchange: see the module docstring)."""

    def __init__(self, groups: NodeGroups):
        self.groups = groups

    def __call__(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, sizes) -> torch.Tensor:
        g = self.groups
        if sizes is None or len(sizes) != g.local_size * g.nodes:
            raise ValueError(f"the hierarchical all-to-all needs the EP group's {g.local_size * g.nodes}x{g.local_size * g.nodes} send matrix")
        return _Hierarchical.apply(x, sizes, g)


def exchange_for(a2a: str, local_size: int = 1, ep_size: int = 1, node_groups: NodeGroups | None = None):
    """The exchange for parallel.a2a (config validation admits only the implemented ones).
    hierarchical with the EP group inside one node (local_size >= ep_size) or one rank per node
    (local_size == 1) has one phase only: that is the flat exchange."""
    if a2a == "flat":
        return flat_all_to_all
    if a2a != "hierarchical":
        raise ValueError(f"parallel.a2a={a2a!r} has no native exchange: use flat or hierarchical")
    if local_size <= 1 or local_size >= ep_size:
        return flat_all_to_all
    if node_groups is None or node_groups.local_size * node_groups.nodes != ep_size or node_groups.local_size != local_size:
        raise ValueError(
            f"parallel.a2a=hierarchical over {ep_size} EP ranks, {local_size} per node, needs the mesh's node groups: "
            "build the mesh with build_mesh(..., ranks_per_node=topology.devices_per_node)"
        )
    return HierarchicalAllToAll(node_groups)
