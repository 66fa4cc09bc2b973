"""Checkpoints: resuming is exact, loading reshards across layouts and placements (a checkpoint
taken after a migration to replicated experts included), a write that dies leaves `latest`
loadable, and loading never unpickles arbitrary objects.

Tolerances: resume under the same layout is exact (fp32 CPU, same thread count: losses compared
with ==). Loading under another layout continues the trajectory within the runtime parity
tolerance of tests/test_parallel_parity.py (losses rtol 1e-5), since the layouts only reorder
floating-point sums; the loaded weights themselves are bit-identical.
"""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from moepipe.config import ConfigError
from moepipe.train import checkpoint as ck
from moepipe.train.loop import Trainer, train
from moepipe.train.preempt import Preempted

from conftest import compose_cfg
from dist_utils import gather_state, run_distributed, save

SMALL = ["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "moe.expert_hidden=32", "train.batch_size=8",
         "train.seq_len=16", "model.max_seq_len=16", "train.eval_batches=1", "data.max_bytes=100000",
         "logger.progress=none", "train.log_every=1", "train.eval_every=0", "train.num_threads=1"]


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.timeout(300)
def test_sigterm_then_resume_is_exact(tmp_path, one_thread, monkeypatch):
    # Router jitter draws from the torch RNG and the aux-free bias is a buffer: both must resume.
    cfg = compose_cfg(SMALL + ["train.steps=6", "train.ckpt_every=2", "moe.router_jitter=0.1", "moe.bias_update_rate=0.01"])
    straight = train(cfg, str(tmp_path / "straight"))

    run = tmp_path / "stopped"
    monkeypatch.setenv("MOEPIPE_INJECT_SIGTERM", "0:2")  # SIGTERM as step index 2 starts
    with pytest.raises(Preempted) as stopped:
        train(cfg, str(run))
    monkeypatch.delenv("MOEPIPE_INJECT_SIGTERM")
    assert stopped.value.step == 3  # the signalled step finished, then a checkpoint
    assert (run / "ckpt" / "latest").read_text().strip() == "step_3"
    assert not (run / "summary.json").exists()  # an incomplete run claims nothing

    resumed = train(cfg, str(run))
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    assert losses(run) == losses(tmp_path / "straight")  # exact: every row, 1..6, once
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert sorted(os.listdir(run / "ckpt")) == ["latest", "step_4", "step_6"]  # ckpt_keep=2


class Died(BaseException):
    """Stands in for SIGKILL inside save_checkpoint (the CLI test in test_faults.py kills for real)."""


@pytest.mark.timeout(120)
def test_a_write_that_dies_leaves_latest_loadable(tmp_path, one_thread, monkeypatch):
    cfg = compose_cfg(SMALL + ["train.steps=4"])
    trainer = Trainer(cfg)
    for step in range(2):
        trainer.train_step(step)
    root = str(tmp_path / "ckpt")
    ck.save_checkpoint(trainer, cfg, root, 2)
    original = trainer.train_step(2).loss

    def die(rank, step):  # where MOEPIPE_INJECT_CKPT_KILL kills: shards and hashes written, not renamed
        raise Died

    monkeypatch.setattr(ck, "_inject_kill_during_write", die)
    with pytest.raises(Died):
        ck.save_checkpoint(trainer, cfg, root, 3)
    monkeypatch.undo()
    assert os.path.isdir(os.path.join(root, "step_3.tmp")) and ck.latest_checkpoint(root).endswith("step_2")

    fresh = Trainer(cfg)
    latest = ck.latest_checkpoint(root)
    assert ck.load_checkpoint(fresh, ck.ResumePoint(latest, ck.read_manifest(latest)), cfg) == 2
    assert fresh.train_step(2).loss == original  # the same step from the same state, exactly
    ck.save_checkpoint(fresh, cfg, root, 3)  # the next save clears the dead write
    assert sorted(os.listdir(root)) == ["latest", "step_2", "step_3"]


@pytest.mark.timeout(120)
def test_metadata_is_read_without_arbitrary_unpickling(tmp_path, one_thread):
    cfg = compose_cfg(SMALL + ["train.steps=2"])
    trainer = Trainer(cfg)
    trainer.train_step(0)
    root = str(tmp_path / "ckpt")
    path = ck.save_checkpoint(trainer, cfg, root, 1)
    assert isinstance(ck.read_metadata(path), ck.Metadata)  # DCP's own file passes the allowlist

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(os.path.join(path, ck.METADATA), "wb") as f:
        pickle.dump(Evil(), f)
    manifest = ck.read_manifest(path)  # an attacker can fix the checksum too: the unpickler must hold
    manifest["files"][ck.METADATA] = ck._sha256(os.path.join(path, ck.METADATA))
    with open(os.path.join(path, ck.MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ConfigError, match="is not allowed in checkpoint metadata"):
        ck.load_checkpoint(Trainer(cfg), ck.ResumePoint(path, manifest), cfg)
    assert not marker.exists()


# ----------------------------------------------------------------------------- resharding

RESHARD = ["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=4", "model.max_seq_len=16",
           "moe.expert_hidden=32", "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=0", "moe.aux_loss_coef=0",
           "moe.z_loss_coef=0.01", "train.batch_size=16", "train.seq_len=16", "train.steps=6", "train.dtype=fp32",
           "data.max_bytes=100000", "optim.warmup_steps=2", "optim.lr=3e-3", "optim.grad_clip=0.05",
           "schedule.name=1f1b", "schedule.microbatches=4"]
HALF = 3


def reshard_cfg(pp: int, ep: int):
    return compose_cfg(RESHARD + [f"parallel.pp={pp}", f"parallel.ep={ep}", "parallel.dp=1"])


def replicated_plan():
    """Where the saving run migrated to: 1 block + 3, one expert per layer on both EP ranks."""
    from moepipe.placement.plan import Plan

    expert_map = {layer: [[0, 1] if e == 2 * layer else [(e + 1) % 2] for e in range(8)] for layer in range(4)}
    return Plan(stage_layers=[(0, 1), (1, 4)], stage_to_pp_rank=[0, 1], expert_map=expert_map, pp=2, ep=2, dp=1)


def scattered_plan():
    """Another pp2 x ep2 placement: 3 blocks + 1, experts interleaved per layer, no replicas."""
    from moepipe.placement.plan import Plan

    expert_map = {layer: [[(e + layer) % 2] for e in range(8)] for layer in range(4)}
    return Plan(stage_layers=[(0, 3), (3, 4)], stage_to_pp_rank=[0, 1], expert_map=expert_map, pp=2, ep=2, dp=1)


def _reshard_worker(rank: int, world: int, root: str, out: str) -> None:
    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer
    from moepipe.train.preempt import StopOnSignal

    cfg22, cfg14 = reshard_cfg(2, 2), reshard_cfg(1, 4)
    mesh22 = build_mesh(2, 2, 1)
    mesh14 = build_mesh(1, 4, 1)
    first = DistributedTrainer(cfg22, mesh22)
    saved_losses = [first.train_step(s).loss for s in range(HALF)]
    first.migrate(replicated_plan())  # the checkpoint holds replicated experts and a moved layer
    path = ck.save_checkpoint(first, cfg22, root, HALF, {"model": {}, "moe": {}})
    weights = gather_state(list(first.modules.values()), rank)
    point = ck.ResumePoint(path, ck.read_manifest(path))
    kept = ck.plan_for_resume(point, cfg22)  # same mesh and placer: the migrated plan is kept
    assert kept == replicated_plan() and ck.plan_for_resume(point, cfg14) is None
    results = {"saved": saved_losses, "weights": weights}
    for label, cfg, mesh, plan in (("pp2_ep2_kept", cfg22, mesh22, kept), ("pp1_ep4", cfg14, mesh14, None),
                                   ("pp2_ep2_scattered", cfg22, mesh22, scattered_plan())):
        trainer = DistributedTrainer(cfg, mesh, plan)
        assert ck.load_checkpoint(trainer, point, cfg) == HALF
        results[label] = [trainer.train_step(s).loss for s in range(HALF, 2 * HALF)]
    # SIGTERM reaching one rank stops all of them at the same step.
    with StopOnSignal() as stop:
        stop.requested = rank == 2
        results["agreed"] = stop.agreed(first)
    flags = [None] * world
    torch.distributed.all_gather_object(flags, results["agreed"])
    if rank == 0:
        assert all(flags), flags
        save(results, os.path.join(out, "reshard.pt"))


@pytest.mark.timeout(400)
def test_pp2_ep2_checkpoint_continues_under_other_layouts(tmp_path):
    root = str(tmp_path / "ckpt")
    run_distributed(_reshard_worker, 4, root, str(tmp_path), timeout=360)
    got = torch.load(tmp_path / "reshard.pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers (see test_parallel_parity)
    try:
        ref = Trainer(reshard_cfg(1, 1))
        ref_losses = [ref.train_step(s).loss for s in range(2 * HALF)]
        single = Trainer(reshard_cfg(1, 1))
        path = ck.latest_checkpoint(root)
        assert ck.load_checkpoint(single, ck.ResumePoint(path, ck.read_manifest(path)), reshard_cfg(1, 1)) == HALF
        for name, p in single.model.named_parameters():  # loading is bit-exact, whatever the layout
            assert torch.equal(p.detach(), got["weights"][name]), name
        single_losses = [single.train_step(s).loss for s in range(HALF, 2 * HALF)]
    finally:
        torch.set_num_threads(threads)

    close = dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["saved"]), torch.tensor(ref_losses[:HALF]), **close)
    for label in ("pp2_ep2_kept", "pp1_ep4", "pp2_ep2_scattered"):
        torch.testing.assert_close(torch.tensor(got[label]), torch.tensor(ref_losses[HALF:]), **close, msg=label)
    torch.testing.assert_close(torch.tensor(single_losses), torch.tensor(ref_losses[HALF:]), **close)
