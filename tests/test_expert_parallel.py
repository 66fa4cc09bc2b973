"""Expert-parallel dispatch equals local dispatch: outputs and gradients, any expert map."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moepipe.config import MoEConfig
from moepipe.model.moe import MoELayer
from moepipe.model.expert_dispatch import ExpertParallelDispatcher, segment_permutation

from dist_utils import run_distributed, save

D, E = 16, 8


def test_segment_permutation_reorders_segments():
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])  # rows laid out (a, b): a0b0 a0b0 a0b2 a1b0 a1b1 a1b1 a1b1
    perm = segment_permutation(counts)
    # (b, a) order: b0: a0 rows 0,1 then a1 row 3; b1: a1 rows 4,5,6; b2: a0 row 2
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]
    # the dispatcher passes the total it already read on the host: same permutation, no read
    assert segment_permutation(counts, 7).tolist() == perm.tolist()


def _layer(cfg: MoEConfig) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, cfg)
    return layer


def _worker(rank: int, world: int, owners: list[int], cfg: MoEConfig, out_dir: str) -> None:
    full = _layer(cfg)
    local = _layer(cfg)
    for key in list(local.experts.keys()):
        if owners[int(key)] != rank:
            del local.experts[key]
    local.dispatcher = ExpertParallelDispatcher([[o] for o in owners], rank, dist.group.WORLD, E)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank routes different tokens
    x = torch.randn(5 + 3 * rank, 4, D, generator=gen, requires_grad=True)
    y = local(x)
    (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
    grads = {n: p.grad for n, p in local.named_parameters() if p.grad is not None}
    # what this rank would compute alone with every expert, for its own tokens
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = full(x_ref)
    (y_ref * torch.arange(y_ref.numel()).reshape(y_ref.shape).sin()).sum().backward()
    save({"y": y.detach(), "y_ref": y_ref.detach(), "gx": x.grad, "gx_ref": x_ref.grad, "grads": grads,
          "ref_grads": {n: p.grad for n, p in full.named_parameters() if p.grad is not None}},
         os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("owners", [[0, 0, 0, 0, 1, 1, 1, 1], [1, 0, 0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1, 1, 0]],
                         ids=["contiguous", "scattered", "lopsided"])
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0, -0.5])
def test_ep_dispatch_matches_local(owners, capacity_factor, tmp_path):
    cfg = MoEConfig(num_experts=E, top_k=2, expert_hidden=24, capacity_factor=capacity_factor, z_loss_coef=0.01)
    run_distributed(_worker, 2, owners, cfg, str(tmp_path), timeout=150)
    expert_grad_sum: dict[str, torch.Tensor] = {}
    ref_sum: dict[str, torch.Tensor] = {}
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(res["y"], res["y_ref"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["gx"], res["gx_ref"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["grads"]["router.weight"], res["ref_grads"]["router.weight"], rtol=1e-5, atol=1e-6)
        for n, g in res["grads"].items():
            if n.startswith("experts."):
                expert_grad_sum[n] = expert_grad_sum.get(n, 0) + g
        for n, g in res["ref_grads"].items():
            if n.startswith("experts."):
                ref_sum[n] = ref_sum.get(n, 0) + g
    # an expert's gradient on its owner is the sum over every rank's tokens routed to it
    for n, g in expert_grad_sum.items():
        torch.testing.assert_close(g, ref_sum[n], rtol=1e-5, atol=1e-6)
    assert set(expert_grad_sum) <= set(ref_sum) and len(expert_grad_sum) > 0


def _replica_worker(rank: int, world: int, holders: list[list[int]], cfg: MoEConfig, local_size: int, out_dir: str) -> None:
    full = _layer(cfg)
    local = _layer(cfg)
    for key in list(local.experts.keys()):
        if rank not in holders[int(key)]:
            del local.experts[key]
    local.dispatcher = ExpertParallelDispatcher(holders, rank, dist.group.WORLD, E, local_size=local_size)
    gen = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(4 + 2 * rank, 4, D, generator=gen, requires_grad=True)
    y = local(x)
    (y * torch.arange(y.numel()).reshape(y.shape).cos()).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = full(x_ref)
    (y_ref * torch.arange(y_ref.numel()).reshape(y_ref.shape).cos()).sum().backward()
    # what each copy processed: the rule on the gathered counts, as every rank derives it
    kept = torch.stack([torch.zeros(E, dtype=torch.long) for _ in range(world)])
    dist.all_gather(list(kept.unbind(0)), local.stats.kept.clone())
    save({"y": y.detach(), "y_ref": y_ref.detach(), "gx": x.grad, "gx_ref": x_ref.grad,
          "grads": {n: p.grad for n, p in local.named_parameters() if p.grad is not None},
          "ref_grads": {n: p.grad for n, p in full.named_parameters() if p.grad is not None},
          "split": local.dispatcher.split(kept)}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_nearest_replica_dispatch_matches_local(capacity_factor, tmp_path):
    # 4 ranks as 2 nodes x 2: expert 0 on every rank (own copy), 1 on ranks 0 and 1 (node 0 only:
    # node 1 spreads over them), 2 on ranks 1 and 3 (own node everywhere), 3 on 0 and 2, rest single
    holders = [[0, 1, 2, 3], [0, 1], [1, 3], [0, 2], [3], [2], [1], [0]]
    cfg = MoEConfig(num_experts=E, top_k=2, expert_hidden=24, capacity_factor=capacity_factor, z_loss_coef=0.01)
    run_distributed(_replica_worker, 4, holders, cfg, 2, str(tmp_path), timeout=200)
    got, ref = {}, {}
    splits = []
    for r in range(4):
        res = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(res["y"], res["y_ref"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["gx"], res["gx_ref"], rtol=1e-5, atol=1e-6)
        for n, g in res["grads"].items():
            if n.startswith("experts."):
                got[n] = got.get(n, 0) + g
        for n, g in res["ref_grads"].items():
            if n.startswith("experts."):
                ref[n] = ref.get(n, 0) + g
        splits.append(res["split"])
    # copies of an expert together got every rank's tokens for it: their summed gradients equal the reference's
    for n, g in got.items():
        torch.testing.assert_close(g, ref[n], rtol=1e-5, atol=1e-6)
    assert set(got) == set(ref)
    # every rank derived the same split, and each source's tokens for expert 0 stayed home
    assert all(torch.equal(s, splits[0]) for s in splits)
    split = splits[0]
    for s in range(4):
        assert split[s, 0, s] == split[s, 0].sum()  # holders of expert 0 are [0, 1, 2, 3]: copy s is rank s
        assert split[s, 2, s // 2] == split[s, 2].sum()  # expert 2: rank 1 in node 0, rank 3 in node 1
