"""The hierarchical all-to-all (parallel.a2a=hierarchical) is the flat exchange, bit for bit.

On 4 gloo processes declared as 2 nodes x 2 (the mesh's node groups): random uneven send
matrices with zeros (whole rows, whole columns, everything) give the same received rows and the
same input gradients as the flat exchange, compared as raw bits; the expert-parallel dispatcher
with either exchange gives the same outputs and gradients and still reads the host once per
call; and training pp1 x ep4 under topology=local_cpu_2nodes gives the same losses and weights
as the flat exchange, bit for bit (the exchange only copies rows, so nothing may differ).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moepipe.config import ConfigError, MoEConfig
from moepipe.model.all_to_all import HierarchicalAllToAll, NodeGroups, exchange_for, flat_all_to_all

from conftest import compose_cfg
from dist_utils import run_distributed, save

WORLD, D = 4, 3


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits: -0.0 != 0.0 and NaN == NaN, unlike torch.equal."""
    return t.contiguous().view(torch.int32)


def matrices() -> list[list[list[int]]]:
    """Send matrices [src][dst], the same on every rank (seeded)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for trial in range(6):
        m = torch.randint(0, 6, (WORLD, WORLD), generator=gen)
        m[torch.rand(WORLD, WORLD, generator=gen) < 0.3] = 0  # scattered zeros
        if trial == 1:
            m[2] = 0  # a rank that sends nothing
        if trial == 2:
            m[:, 1] = 0  # a rank that receives nothing
        if trial == 3:
            m[:] = 0  # nobody sends anything
        if trial == 4:
            m[:2, 2:] = 0  # node 0 sends nothing across nodes
        out.append(m.tolist())
    return out


def _exchange_worker(rank: int, world: int, out_dir: str) -> None:
    from moepipe.parallel.mesh import build_mesh

    mesh = build_mesh(1, world, 1, ranks_per_node=2)
    g = mesh.node_groups
    assert (g.local_size, g.nodes, g.node, g.local) == (2, 2, rank // 2, rank % 2)
    assert dist.get_world_size(g.intra) == 2 and dist.get_world_size(g.inter) == 2
    hier = exchange_for("hierarchical", 2, world, g)
    assert isinstance(hier, HierarchicalAllToAll)
    results = []
    for trial, m in enumerate(matrices()):
        in_splits, out_splits = m[rank], [m[s][rank] for s in range(world)]
        gen = torch.Generator().manual_seed(1000 * trial + rank)
        x = torch.randn(sum(in_splits), D, generator=gen)
        if x.numel():
            x[0, 0] = -0.0  # signs of zero must survive
        upstream = torch.randn(sum(out_splits), D, generator=gen)
        got = {}
        for name, fn in (("flat", flat_all_to_all), ("hier", hier)):
            xi = x.clone().requires_grad_(True)
            y = fn(xi, out_splits, in_splits, mesh.ep_group, m)
            (y * upstream).sum().backward()
            got[name] = (y.detach(), xi.grad)
        # rows arrive in source order, each source's in its own order: tag = 1000 * row + source
        want = [float(1000 * t + s) for s in range(world) for t in range(m[s][rank])]
        tags = torch.tensor([1000.0 * t + rank for d in range(world) for t in range(m[rank][d])]).reshape(-1, 1)
        tagged = hier(tags, out_splits, in_splits, mesh.ep_group, m)
        results.append({"flat": got["flat"], "hier": got["hier"], "tag": tagged.reshape(-1).tolist(), "want_tag": want})
    save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(120)
def test_hierarchical_equals_flat_bitwise(tmp_path):
    run_distributed(_exchange_worker, WORLD, str(tmp_path), timeout=100)
    for rank in range(WORLD):
        for trial, res in enumerate(torch.load(tmp_path / f"rank{rank}.pt")):
            (yf, gf), (yh, gh) = res["flat"], res["hier"]
            assert yf.shape == yh.shape and torch.equal(bits(yf), bits(yh)), (rank, trial)
            assert gf.shape == gh.shape and torch.equal(bits(gf), bits(gh)), (rank, trial)
            # the tags say who sent each row: the order is the flat exchange's, not only the bits
            assert res["tag"] == res["want_tag"], (rank, trial)


E = 8


def _dispatch_worker(rank: int, world: int, out_dir: str) -> None:
    from moepipe.model.expert_dispatch import ExpertParallelDispatcher
    from moepipe.model.moe import MoELayer
    from moepipe.parallel.mesh import build_mesh
    from test_host_sync import SyncGuard

    mesh = build_mesh(1, world, 1, ranks_per_node=2)
    cfg = MoEConfig(num_experts=E, top_k=2, expert_hidden=16, capacity_factor=1.0, z_loss_coef=0.01)
    holders = [[e % world] for e in range(E)]
    holders[0] = [0, 3]  # a replicated expert: its tokens split over a rank on each node
    out = {}
    for a2a in ("flat", "hierarchical"):
        torch.manual_seed(0)
        layer = MoELayer(16, cfg)
        layer.attach_expert_group(holders, rank, mesh.ep_group, a2a=a2a, local_size=2, node_groups=mesh.node_groups)
        assert isinstance(layer.dispatcher, ExpertParallelDispatcher)
        assert isinstance(layer.dispatcher.exchange, HierarchicalAllToAll) == (a2a == "hierarchical")
        gen = torch.Generator().manual_seed(50 + rank)
        x = torch.randn(3 + 2 * rank, 4, 16, generator=gen, requires_grad=True)
        with SyncGuard() as guard:
            y = layer(x)
            (y * y).sum().backward()
        assert guard.total == 1, guard.report()  # the one read of split sizes, whichever exchange
        out[a2a] = {"y": y.detach(), "gx": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}
    save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(120)
def test_dispatcher_hierarchical_equals_flat_bitwise(tmp_path):
    run_distributed(_dispatch_worker, WORLD, str(tmp_path), timeout=100)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        flat, hier = res["flat"], res["hierarchical"]
        assert set(flat) == set(hier) and any(k.startswith("experts.") for k in flat)
        for k in flat:
            assert torch.equal(bits(flat[k]), bits(hier[k])), (rank, k)


PARITY = ["model.n_layers=4", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.max_seq_len=16",
          "moe.expert_hidden=32", "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=0", "moe.z_loss_coef=0.01",
          "train.batch_size=16", "train.seq_len=16", "train.steps=3", "train.dtype=fp32", "data.max_bytes=200000",
          "optim.warmup_steps=0", "optim.grad_clip=0.05", "schedule.microbatches=2", "placer=static",
          "parallel.pp=1", "parallel.ep=4", "parallel.dp=1", "topology=local_cpu_2nodes"]


def _train_worker(rank: int, world: int, out_dir: str) -> None:
    from moepipe.train.distributed import DistributedTrainer
    from moepipe.train.launch import mesh_for

    out = {}
    for a2a in ("flat", "hierarchical"):
        cfg = compose_cfg(PARITY + [f"parallel.a2a={a2a}"])
        mesh = mesh_for(cfg)  # as the launcher builds it: node groups from the topology
        assert (mesh.node_groups is not None) == (a2a == "hierarchical")
        trainer = DistributedTrainer(cfg, mesh, None)
        losses = [trainer.train_step(s).loss for s in range(cfg.train.steps)]
        params = {n: p.detach().clone() for m in trainer.modules.values() for n, p in m.named_parameters()}
        out[a2a] = {"losses": losses, "params": params}
    save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(180)
def test_training_hierarchical_equals_flat(tmp_path):
    """pp1 x ep4 over 2 declared nodes: every step's loss and every final weight bit for bit."""
    run_distributed(_train_worker, WORLD, str(tmp_path), timeout=150)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        flat, hier = res["flat"], res["hierarchical"]
        assert flat["losses"] == hier["losses"]
        assert flat["losses"][-1] < flat["losses"][0]
        assert set(flat["params"]) == set(hier["params"])
        for n in flat["params"]:
            assert torch.equal(bits(flat["params"][n]), bits(hier["params"][n])), (rank, n)


def test_exchange_choice():
    """One phase only (the EP group inside a node, or a rank per node) is the flat exchange;
    an exchange over several nodes without the mesh's groups is a one-line error."""
    assert exchange_for("flat") is flat_all_to_all
    assert exchange_for("hierarchical", 4, 4) is flat_all_to_all  # ep4 inside a 4-rank node
    assert exchange_for("hierarchical", 8, 2) is flat_all_to_all
    assert exchange_for("hierarchical", 1, 4) is flat_all_to_all
    with pytest.raises(ValueError, match="needs the mesh's node groups"):
        exchange_for("hierarchical", 2, 4)
    with pytest.raises(ValueError, match="needs the mesh's node groups"):
        exchange_for("hierarchical", 2, 4, NodeGroups(2, 4, 0, 0, None, None))  # 8 ranks, not 4
    with pytest.raises(ValueError, match="no native exchange"):
        exchange_for("ring")


@pytest.mark.parametrize("overrides,message", [
    (["parallel=pp2", "parallel.a2a=hierarchical"], "parallel.a2a=hierarchical needs expert parallelism (parallel.ep=1)"),
    (["parallel.pp=1", "parallel.ep=4", "parallel.a2a=hierarchical", "topology.nodes=2", "topology.devices_per_node=3",
      "topology.device_groups=[{count:6}]"], "topology.devices_per_node=3 splits the EP groups of parallel.ep=4"),
    (["parallel.pp=2", "parallel.ep=4", "parallel.a2a=hierarchical", "schedule.microbatches=2", "train.batch_size=16",
      "topology=local_cpu_2nodes"], "topology.nodes*devices_per_node=4 < parallel.pp*ep*dp=8"),
])
def test_rejected_layouts(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_cfg(overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value) and ": " in str(err.value)


def test_accepted_layouts():
    """EP groups of whole nodes, or inside one node (pp2 x ep2 over 2 nodes x 2: each stage's
    EP pair is one node), pass; so does a job on one node of a bigger topology."""
    for extra in (["parallel.pp=1", "parallel.ep=4", "topology=local_cpu_2nodes"],
                  ["parallel.pp=2", "parallel.ep=2", "topology=local_cpu_2nodes"],
                  ["parallel.pp=1", "parallel.ep=3", "moe.num_experts=6", "train.batch_size=12", "topology=local_cpu"]):
        assert compose_cfg(extra + ["parallel.a2a=hierarchical"]).parallel.a2a == "hierarchical"
