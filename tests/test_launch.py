"""The launcher: a multi-process job from one Hydra run, and a failing worker ends the whole
job with a non-zero status and that worker's error, never a hang."""
import json
import os
import subprocess
import sys

import pytest

SMALL = ["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "moe.expert_hidden=32", "train.batch_size=8",
         "train.seq_len=16", "train.eval_batches=1", "data.max_bytes=300000", "logger.progress=plain"]


def run_cli(tmp_path, *overrides, env=None, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "moepipe.train", *SMALL, *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.mark.timeout(300)
def test_pp2_ep2_job_runs_from_one_hydra_job(tmp_path):
    proc = run_cli(tmp_path, "parallel=pp2_ep2", "train.steps=4", "train.log_every=2", "train.eval_every=4",
                   "logger=wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]  # written once, by the metrics rank
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1  # one W&B run for the job


@pytest.mark.timeout(300)
def test_bf16_pipeline_with_expert_parallelism_runs(tmp_path):
    # The GPU default precision, exercised with CPU autocast: bf16 expert outputs cross the
    # all-to-all, bf16 logits are the last stage's declared output.
    proc = run_cli(tmp_path, "parallel=pp2_ep2", "train.dtype=bf16", "train.steps=2", "train.log_every=1", "train.eval_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16" and summary["final_val_loss"] < 6


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,expect", [("raise", "injected fault on rank 1 at step 2"), ("kill", "signal SIGKILL")])
def test_failing_worker_fails_the_job_with_its_error(tmp_path, kind, expect):
    proc = run_cli(tmp_path, "parallel=pp2", "train.steps=6", "train.eval_every=0",
                   env={"MOEPIPE_INJECT_FAULT": f"1:2:{kind}"}, timeout=240)
    assert proc.returncode == 1
    assert "worker 1" in proc.stderr and expect in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "summary.json").exists()  # no partial result passed off as complete
