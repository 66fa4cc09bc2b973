"""Chimera (schedule=chimera): two model replicas as pipelines in opposite directions. Rank r
holds stage r of the down replica and stage pp-1-r of the up one; half the microbatches run
each way; each stage's two copies sum their gradients before the optimizer step, so both
replicas stay identical (tests/dist_utils.gather_state checks that bitwise) and the run matches
the single-process reference to 1e-5 (tests/test_parallel_parity.py says why 1e-5).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from moepipe.config import ConfigError

from conftest import compose_cfg
from dist_utils import gather_state, run_distributed, save

STEPS = 3
TINY = ["model.d_model=16", "model.n_heads=2", "model.ffn_hidden=32", "model.n_layers=4", "model.max_seq_len=8",
        "moe.num_experts=4", "moe.expert_hidden=16", "moe.top_k=2", "moe.capacity_factor=0", "moe.aux_loss_coef=0",
        "moe.z_loss_coef=0.01", "train.batch_size=8", "train.seq_len=8", f"train.steps={STEPS}", "train.dtype=fp32",
        "data.max_bytes=100000", "optim.warmup_steps=1", "optim.lr=3e-3", "optim.grad_clip=0.05", "train.eval_batches=1"]


def _cfg(pp: int = 1, ep: int = 1, m: int = 4, schedule: str = "chimera"):
    return compose_cfg(TINY + [f"schedule={schedule}", f"schedule.microbatches={m}", f"parallel.pp={pp}", f"parallel.ep={ep}", "parallel.dp=1"])


@pytest.fixture(scope="module")
def reference():
    """Plain single-process training (the schedule only orders the same sums)."""
    from moepipe.train.loop import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(_cfg(schedule="1f1b"))
        losses = [trainer.train_step(s).loss for s in range(STEPS)]
        losses.append(trainer.evaluate())
        return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    finally:
        torch.set_num_threads(threads)


def _worker(rank: int, world: int, pp: int, ep: int, m: int, out_dir: str) -> None:
    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer

    trainer = DistributedTrainer(_cfg(pp, ep, m), build_mesh(pp, ep, 1), None)
    losses = [trainer.train_step(s).loss for s in range(STEPS)]
    losses.append(trainer.evaluate())
    state = gather_state(list(trainer.modules.values()), rank)  # asserts the two replicas are identical
    if rank == 0:
        save({"losses": losses, "state": state, "type": type(trainer.schedule).__name__,
              "stages": sorted(trainer.modules)}, os.path.join(out_dir, "chimera.pt"))


def _moved_plan():
    """pp2 x ep2: 1 block + 3 instead of 2 + 2, experts interleaved per layer, one replica."""
    from moepipe.placement.plan import Plan

    expert_map = {layer: [[(e + layer) % 2] for e in range(4)] for layer in range(4)}
    expert_map[1][0] = [0, 1]
    return Plan(stage_layers=[(0, 1), (1, 4)], stage_to_pp_rank=[0, 1], expert_map=expert_map, pp=2, ep=2, dp=1)


def _moving_worker(rank: int, world: int, root: str, out_dir: str) -> None:
    """Step 0, a migration that moves a block and experts (both replicas of each), step 1, a
    checkpoint; a new trainer resumes it on the migrated plan and runs step 2."""
    from moepipe.parallel.mesh import build_mesh
    from moepipe.parallel.migration import home
    from moepipe.train import checkpoint as ck
    from moepipe.train.distributed import DistributedTrainer

    cfg, mesh = _cfg(2, 2, 4), build_mesh(2, 2, 1)
    first = DistributedTrainer(cfg, mesh, None)
    losses = [first.train_step(0).loss]
    moved = first.migrate(_moved_plan())
    plan = first.plan
    # both replicas move: the embedding lives on pp rank 0 (down) and pp rank 1 (up), EP ranks alike
    assert home("tok_embeddings.weight", plan, 2) == [0, 1, 2, 3] and home("tok_embeddings.weight", plan) == [0, 1]
    assert sorted(first.modules) == ([0, 3] if mesh.pp_rank == 0 else [1, 2])
    assert [len(m.layers) for _, m in sorted(first.modules.items())] == ([1, 3] if mesh.pp_rank == 0 else [3, 1])
    losses.append(first.train_step(1).loss)
    path = ck.save_checkpoint(first, cfg, root, 2, {"model": {}, "moe": {}})
    point = ck.ResumePoint(path, ck.read_manifest(path))
    resumed = DistributedTrainer(cfg, mesh, ck.plan_for_resume(point, cfg))
    assert ck.load_checkpoint(resumed, point, cfg) == 2 and resumed.plan == _moved_plan()
    losses.append(resumed.train_step(2).loss)
    losses.append(resumed.evaluate())
    state = gather_state(list(resumed.modules.values()), rank)
    if rank == 0:
        save({"losses": losses, "state": state, "bytes_moved": moved["bytes_moved"]}, os.path.join(out_dir, "moved.pt"))


@pytest.mark.timeout(200)
def test_chimera_with_experts_migrates_both_replicas_and_resumes(reference, tmp_path):
    from test_parallel_parity import assert_matches

    run_distributed(_moving_worker, 4, str(tmp_path / "ckpt"), str(tmp_path), timeout=180)
    got = torch.load(tmp_path / "moved.pt")
    assert got["bytes_moved"] > 0
    losses, state = reference
    assert_matches(got, losses, state, label="chimera pp2 ep2, migrated and resumed")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("pp,ep,m", [(2, 1, 4), (4, 1, 4)], ids=["pp2_m2D", "pp4_mD"])
def test_distributed_chimera_matches_the_reference(pp, ep, m, reference, tmp_path):
    from test_parallel_parity import assert_matches

    run_distributed(_worker, pp * ep, pp, ep, m, str(tmp_path), timeout=130)
    got = torch.load(tmp_path / "chimera.pt")
    assert got["type"] == "ScheduleExecutor"
    assert got["stages"] == [0, 2 * pp - 1]  # pp rank 0: down stage 0 and the up replica's last stage
    losses, state = reference
    assert_matches(got, losses, state, label=f"chimera pp{pp} ep{ep}")


# ------------------------------------------------------------------ simulator

def _uniform(pp: int, m: int):
    """Every block 1 ms forward and 1 ms backward (input 0.5 + weight 0.5), nothing else."""
    from test_sim import setup

    prof = {"device": {"tflops": 0.01}, "tokens_per_microbatch": 128,
            "layers": {str(i): {"fwd_s": 1e-3, "bwd_input_s": 5e-4, "bwd_weight_s": 5e-4} for i in range(8)},
            "embedding": {"fwd_s": 0, "bwd_s": 0}, "head": {"fwd_s": 0, "bwd_s": 0},
            "expert_per_token_s": {"fwd_s": 0, "bwd_s": 0}}
    return setup(pp=pp, ep=1, m=m, profile=prof, name="chimera", per_node=8)


def _engine(pp: int, m: int):
    from moepipe.sim.schedules import schedule_order
    from moepipe.sim.simulator import simulate_order

    order, s2r = schedule_order("chimera", pp, 1, m)
    return simulate_order(order, s2r, m, np.tile([1.0, 1.0, 0.0], (2 * pp, 1)))


@pytest.mark.parametrize("pp,m", [(4, 4), (4, 8), (8, 8), (8, 16)])
def test_simulated_bubble_is_the_papers_for_uniform_stages(pp, m):
    from moepipe.sim.simulator import simulate

    plan, topo, cm = _uniform(pp, m)
    one = simulate(plan, "1f1b", m, topo, cm, free_comm=True)
    two = simulate(plan, "chimera", m, topo, cm, free_comm=True)
    fb = one.iteration_time_s / (m + pp - 1)  # F + B of one stage
    assert one.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1))
    assert two.bubble_fraction == pytest.approx((pp - 2) / (2 * m + pp - 2))
    assert two.iteration_time_s == pytest.approx(fb * (m + pp / 2 - 1))  # (pp/2 - 1) bubbles of F + B per rank
    assert two.balanced_bound_s == pytest.approx(two.iteration_time_s) and two.n_stages == 2 * pp
    # two weight copies: rank r holds stage r of one replica and stage pp-1-r of the other
    w1 = one.weight_bytes.reshape(pp, -1)[:, 0]
    np.testing.assert_allclose(two.weight_bytes.reshape(pp, -1)[:, 0], w1 + w1[::-1])
    # balanced activations: pp/2+1 .. pp microbatches per rank at m = pp, pp everywhere from m = 2pp
    # (microbatches held at once per rank, both replicas' stages together), vs 1F1B's pp - r
    held = [int(x.sum(1).max()) for _, x in sorted(_engine(pp, m).inflight.items())]
    assert held == ([pp // 2 + 1 + min(r, pp - 1 - r) for r in range(pp)] if m == pp else [pp] * pp), held
    a1, a2 = one.peak_activation_bytes, two.peak_activation_bytes  # bytes: the ranks with a last stage also keep logits
    assert a1.max() / a1.min() > 3 and a2.max() / a2.min() < (1.7 if m == pp else 1.05)
    assert a2.max() < 1.05 * a1.max()


def test_chimera_config_errors_are_one_line():
    from moepipe.sim.schedules import schedule_program

    with pytest.raises(ConfigError, match="even parallel.pp and an even schedule.microbatches"):
        schedule_program("chimera", 3, 1, 4)
    with pytest.raises(ConfigError, match="virtual_stages=2 with schedule.name=chimera"):
        schedule_program("chimera", 2, 2, 4)
    with pytest.raises(ConfigError, match="set schedule.executor=moepipe"):
        compose_cfg(TINY + ["schedule.name=chimera", "schedule.executor=torch"])
