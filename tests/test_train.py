"""The single-process training loop: it learns the stdlib corpus, writes its results files,
and its microbatch accumulation is the full-batch arithmetic (the reference for the runtime)."""
import json
import math
import subprocess
import sys

import pytest
import torch

from moepipe.train.loop import Trainer, train

from conftest import compose_cfg

SUMMARY_KEYS = {"steps", "final_train_loss", "final_val_loss", "tokens_per_s", "wall_time_s", "world_size",
                "config", "git_commit", "packages"}
ROW_KEYS = {"step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "load_balance_mean",
            "load_balance_max", "dropped_frac"}


@pytest.mark.timeout(600)
def test_tiny_model_learns_stdlib_bytes(tmp_path):
    cfg = compose_cfg(["train.steps=150", "train.eval_every=150", "train.log_every=50", "logger.progress=none", "schedule.microbatches=1",
                       "train.num_threads=2"])
    summary = train(cfg, str(tmp_path))
    print(f"tiny, 150 steps: val loss {summary['final_val_loss']:.3f} nats/byte")
    # ln 256 = 5.55 (uniform); a byte-unigram model gets ~3 nats on this corpus.
    assert summary["final_val_loss"] < 2.8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] > rows[-1]["loss"] + 0.5  # means over steps 1-50 vs 101-150
    assert all(ROW_KEYS <= set(r) for r in rows if "loss" in r)


def test_microbatches_accumulate_to_the_full_batch_gradient():
    # Dropless routing, no batch-statistic losses: splitting the batch must not change the maths.
    base = ["moe.aux_loss_coef=0", "moe.z_loss_coef=0", "train.batch_size=8", "train.seq_len=32", "data.max_bytes=200000"]
    grads = []
    for m in (1, 4):
        cfg = compose_cfg(base + [f"schedule.microbatches={m}"])
        torch.manual_seed(0)
        trainer = Trainer(cfg)
        trainer.train_step(0)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_aux_free_bias_moves_against_load():
    cfg = compose_cfg(["moe=aux_free", "train.batch_size=8", "train.seq_len=32", "data.max_bytes=200000"])
    trainer = Trainer(cfg)
    trainer.train_step(0)
    for _, moe in trainer.model.moe_layers():
        load = moe.stats.demand.float()
        bias = moe.router.expert_bias
        rate = cfg.moe.bias_update_rate
        torch.testing.assert_close(bias, rate * torch.sign(load.mean() - load))


@pytest.mark.timeout(300)
def test_cli_writes_metrics_summary_and_offline_wandb(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moepipe.train", "parallel=single", "train.steps=6", "train.log_every=2", "train.eval_every=3",
         "train.batch_size=4", "train.seq_len=32", "train.eval_batches=2", "logger=wandb",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final train loss" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    assert all(ROW_KEYS <= set(r) for r in logged)
    assert {r["step"] for r in rows if "val_loss" in r} == {3, 6}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 6 and summary["world_size"] == 1 and math.isfinite(summary["final_val_loss"])
    assert summary["config"]["train"]["steps"] == 6
    assert list(tmp_path.glob("wandb/offline-run-*")), "W&B offline run directory missing"
    loads = [json.loads(line) for line in (tmp_path / "expert_load.jsonl").read_text().splitlines()]
    assert [r["step"] for r in loads] == [2, 4, 6]
    tokens_per_step = 4 * 32 * summary["config"]["moe"]["top_k"]  # batch * seq * k assignments
    assert all(sum(counts) == tokens_per_step for r in loads for counts in r["tokens_per_expert"].values())


def test_bf16_autocast_trains_and_routes_in_fp32():
    # CPU autocast exercises the GPU default (bf16): expert outputs arrive in bf16 and must
    # combine into the fp32 residual stream; the router must stay fp32.
    cfg = compose_cfg(["train.dtype=bf16", "train.batch_size=8", "train.seq_len=32", "data.max_bytes=200000",
                       "moe=aux_free"])
    trainer = Trainer(cfg)
    assert trainer.amp_dtype == torch.bfloat16
    losses = [trainer.train_step(s).loss for s in range(3)]
    assert all(math.isfinite(l) for l in losses)
    _, moe = next(trainer.model.moe_layers())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moe.router.logits(torch.randn(4, cfg.model.d_model))
    assert logits.dtype == torch.float32
    assert moe.router.expert_bias.abs().sum() > 0  # the bias update ran
