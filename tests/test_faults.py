"""Fault tolerance through the real CLI and launcher (2 gloo workers, pp=2):

1. SIGTERM reaching one worker: all finish the step, save, exit with status 3, no summary.json;
2. rerunning the same command (train.resume=auto, train.max_restarts=2) while
   - attempt 0 loses worker 1 to SIGKILL mid-run,
   - attempt 1 loses worker 0 to SIGKILL while it writes a checkpoint (shards on disk, not yet
     renamed, `latest` not updated),
   resumes from the latest checkpoint each time and completes;
3. the step count and every step's loss, the final loss included, equal an uninterrupted run's
   exactly (same layout, fp32 CPU, one thread per worker).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SMALL = ["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "moe.expert_hidden=32", "train.batch_size=8",
         "train.seq_len=16", "model.max_seq_len=16", "train.eval_batches=1", "data.max_bytes=100000", "logger.progress=none",
         "train.num_threads=1", "parallel=pp2", "train.steps=6", "train.log_every=1", "train.eval_every=0",
         "train.ckpt_every=2", "moe.router_jitter=0.1"]
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("MOEPIPE_")}


def run_cli(run_dir, *overrides, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "moepipe.train", *SMALL, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=timeout, env={**CLEAN, **(env or {})},
    )


def step_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.timeout(600)
def test_preempted_then_crashing_job_finishes_like_an_uninterrupted_one(tmp_path):
    straight = run_cli(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "faulty"
    stopped = run_cli(run, env={"MOEPIPE_INJECT_SIGTERM": "0:1"})  # rank 0 only, as step index 1 starts
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "stopped by SIGTERM after step 2" in stopped.stderr
    assert not (run / "summary.json").exists()
    assert (run / "ckpt" / "latest").read_text().strip() == "step_2"

    faults = {"MOEPIPE_INJECT_FAULT": "1:3:kill",  # attempt 0: worker 1 dies starting step index 3
              "MOEPIPE_INJECT_CKPT_KILL": "0:4:1"}  # attempt 1: worker 0 dies writing step_4
    done = run_cli(run, "train.max_restarts=2", env=faults)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worker 1 exited with code -9 (signal SIGKILL); restart 1/2" in done.stderr
    assert "worker 0 exited with code -9 (signal SIGKILL); restart 2/2" in done.stderr
    # every attempt resumed from step_2: the write killed in attempt 1 never became `latest`
    assert done.stderr.count("resumed from") == 3 and done.stderr.count("step_2 (step 2)") == 3, done.stderr[-3000:]

    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((run / "summary.json").read_text())
    assert b["steps"] == a["steps"] == 6 and b["restarts"] == 2 and b["resumed_from_step"] == 2
    assert b["final_train_loss"] == a["final_train_loss"] and b["final_val_loss"] == a["final_val_loss"]
    assert step_losses(run) == step_losses(tmp_path / "straight")  # steps 1..6, each once, identical
    assert (run / "ckpt" / "latest").read_text().strip() == "step_6"


@pytest.mark.timeout(600)
def test_kill_during_a_migration_restarts_from_the_last_checkpoint(tmp_path):
    """A worker SIGKILLed in the middle of a live migration (state exchanged, stages not yet
    rebuilt): the job restarts from `latest`, re-plans, and ends on the trajectory of an
    uninterrupted run (function-preserving migration: parity tolerance, not bit-exact, since
    where the placer moves experts depends on measured times)."""
    moving = ["parallel=ep2", "schedule.microbatches=1", "placer=topo", "placer.interval=2", "placer.replica_slots=1",
              "workload.kind=hot_rank", "workload.strength=6.0", "moe.aux_loss_coef=0", "moe.router_jitter=0",
              "train.ckpt_every=1"]  # step_1 is on disk when the re-plan after step 2 migrates
    straight = run_cli(tmp_path / "straight", *moving)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "killed"
    done = run_cli(run, *moving, "train.max_restarts=1", env={"MOEPIPE_INJECT_FAULT": "1:2:kill:migration"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worker 1 exited with code -9 (signal SIGKILL); restart 1/1" in done.stderr, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "(step 1)" in done.stderr, done.stderr[-3000:]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "replan" and e.get("migrate") for e in events), "the restarted run never migrated"
    a, b = step_losses(tmp_path / "straight"), step_losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    (latest,) = [(run / "ckpt" / "latest").read_text().strip()]
    assert latest == "step_6"
