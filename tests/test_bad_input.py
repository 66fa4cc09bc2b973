"""The bad-input catalogue (issue #6): every case fails before it can do harm, with one line
`<field>=<value> <problem>: <fix>`, a non-zero exit status through the CLI, and no summary.json
passed off as a complete result. (tests/test_config.py holds the wider list of bad values;
memory-infeasible plans are the placer's tests.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moepipe.config import ConfigError
from moepipe.train import checkpoint as ck
from moepipe.train.loop import NonFiniteLossError, Trainer, train

from conftest import compose_cfg

SMALL = ["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "moe.expert_hidden=32", "train.batch_size=8",
         "train.seq_len=16", "model.max_seq_len=16", "train.eval_batches=1", "data.max_bytes=100000",
         "logger.progress=none", "train.log_every=1", "train.eval_every=0", "train.num_threads=1"]
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("MOEPIPE_")}


def one_line(text: str, *parts: str) -> None:
    assert "\n" not in text.strip() and ": " in text, text
    for part in parts:
        assert part in text, text


CATALOGUE = [
    (["parallel.pp=8", "schedule.microbatches=8"], "parallel.pp*schedule.virtual_stages=8 > model.n_layers=4"),
    (["parallel.pp=2", "schedule.microbatches=1"], "schedule.microbatches=1 < parallel.pp=2"),
    (["schedule.executor=fast"], "schedule.executor='fast' is not known: choose one of torch, moepipe"),
    (["schedule.name=file:/no/such.csv"], "is an action table, which torch's classes cannot run: set schedule.executor=moepipe"),
    (["schedule.name=file:/no/such.csv", "schedule.executor=moepipe"], "schedule.name=file:/no/such.csv: no such file"),
    (["moe.top_k=9"], "moe.top_k=9 > moe.num_experts=8"),
    (["schedule.name=bogus"], "schedule.name='bogus' is not known"),
    (["schedule.name=pipedream_2bw"], "schedule.name=pipedream_2bw has no torch class (its order is the schedule): set schedule.executor=moepipe"),
    (["schedule=pipedream_2bw", "schedule.virtual_stages=2", "parallel.pp=2", "schedule.microbatches=4"],
     "schedule.virtual_stages=2 needs a multi-stage schedule, not schedule.name=pipedream_2bw"),
    (["placer.name=bogus"], "placer.name='bogus'"),
    (["topology.devices_per_node=3"], "but topology.nodes*devices_per_node=3: make the counts add up"),
    (["topology.intra_node_bw_gbps=0"], "topology.intra_node_bw_gbps=0"),
    (["train.resume=/no/such/ckpt"], "train.resume=/no/such/ckpt does not exist"),
    (["train.on_nonfinite=ignore"], "train.on_nonfinite='ignore' is not known"),
    (["train.ckpt_every=-1"], "train.ckpt_every=-1 must be >= 0"),
    (["parallel=pp2", "parallel.backend=gloo", "train.device=cuda"], "parallel.backend=gloo with train.device=cuda"),
    (["parallel=single", "topology.probe=true"], "topology.probe=true measures the workers of a multi-process job"),
    (["parallel=single", "topology.detect=true"], "topology.detect=true measures the workers of a multi-process job"),
    (["parallel=pp2", "parallel.a2a=hierarchical"], "parallel.a2a=hierarchical needs expert parallelism (parallel.ep=1)"),
    (["parallel.ep=4", "parallel.pp=2", "parallel.a2a=hierarchical", "topology=local_cpu_2nodes"],
     "topology.nodes*devices_per_node=4 < parallel.pp*ep*dp=8, but parallel.a2a=hierarchical takes its nodes from the topology"),
    (["parallel.pp=1", "parallel.ep=4", "parallel.a2a=hierarchical", "topology.nodes=2", "topology.devices_per_node=3",
      "topology.device_groups=[{count:6}]"], "topology.devices_per_node=3 splits the EP groups of parallel.ep=4 into unequal parts"),
]


@pytest.mark.parametrize("overrides,message", CATALOGUE, ids=[c[1][:40] for c in CATALOGUE])
def test_config_catalogue(overrides, message):
    # topology.*: a broken topology file (bad values) fails at start-up, placer or not
    with pytest.raises(ConfigError) as err:
        compose_cfg(overrides)
    one_line(str(err.value), message)


def test_world_size_mismatch_under_torchrun(monkeypatch, tmp_path):
    from moepipe.train.launch import launch

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        launch(compose_cfg(["parallel=pp2_ep2"]), str(tmp_path))  # fails before any process group
    one_line(str(err.value), "parallel.pp*ep*dp*tp=4 but torchrun started WORLD_SIZE=2", "nproc_per_node")


def test_missing_data_path(tmp_path):
    from moepipe.train.launch import launch

    with pytest.raises(ConfigError) as err:
        launch(compose_cfg(["data=memmap", "data.path=/no/such/tokens.bin"]), str(tmp_path))
    one_line(str(err.value), "data.path=/no/such/tokens.bin does not exist", "moepipe-make-memmap")
    assert not (tmp_path / "summary.json").exists()


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("saved")
        train(compose_cfg(SMALL + ["train.steps=2", "train.ckpt_every=1"]), str(run))
        return run
    finally:
        torch.set_num_threads(threads)


def copy_run(saved_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(saved_run, dst)
    return dst


def resume_error(run, *overrides) -> str:
    cfg = compose_cfg(SMALL + ["train.steps=4", *overrides])
    with pytest.raises(ConfigError) as err:
        point = ck.find_resume(cfg, str(run))
        ck.load_checkpoint(Trainer(cfg), point, cfg)
    return str(err.value)


def test_checkpoint_errors(saved_run, tmp_path, one_thread):
    run = copy_run(saved_run, tmp_path)
    step2 = run / "ckpt" / "step_2"
    shard = next(p for p in step2.iterdir() if p.suffix == ".distcp")

    one_line(resume_error(run, "model.d_model=64"), "model.d_model=64 but checkpoint", "was written with model.d_model=32")
    one_line(resume_error(run, "train.steps=2"), "train.steps=2 but checkpoint", "is already at step 2", "raise train.steps")
    one_line(resume_error(run, "train.resume=never"), "train.resume=never but", "already holds checkpoints")
    one_line(resume_error(run, f"train.resume={tmp_path}"), f"train.resume={tmp_path} holds no checkpoint")

    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_line(resume_error(run), "is corrupt", shard.name, "train.resume=")

    (step2 / ck.MANIFEST).write_text("{not json")
    one_line(resume_error(run), "has a corrupt manifest.json")

    (step2 / ck.MANIFEST).unlink()
    one_line(resume_error(run), "has no manifest.json")

    shutil.rmtree(step2)
    one_line(resume_error(run), "latest pointer naming 'step_2'")
    # an older intact checkpoint can still be named explicitly
    cfg = compose_cfg(SMALL + ["train.steps=4", f"train.resume={run / 'ckpt' / 'step_1'}"])
    assert ck.find_resume(cfg, str(tmp_path / "elsewhere")).step == 1


# ----------------------------------------------------------------------------- non-finite loss


def nan_at(trainer: Trainer, step: int) -> Trainer:
    """The head emits NaN during step `step` only (counted in forward calls: one per microbatch)."""
    calls = {"n": 0}
    m = trainer.cfg.schedule.microbatches

    def hook(module, inputs, output):
        calls["n"] += 1
        return output * float("nan") if (calls["n"] - 1) // m == step else output

    trainer.model.output.register_forward_hook(hook)
    return trainer


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_stops_or_skips(policy, tmp_path, one_thread):
    cfg = compose_cfg(SMALL + ["train.steps=4", f"train.on_nonfinite={policy}"])
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="loss=nan at step 2"):
            train(cfg, str(tmp_path), trainer_factory=lambda plan: nan_at(Trainer(cfg), 2))
        assert not (tmp_path / "summary.json").exists()
        return
    trainer = nan_at(Trainer(cfg), 2)
    summary = train(cfg, str(tmp_path), trainer_factory=lambda plan: trainer)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4]
    assert [r["step"] for r in rows if r.get("event") == "skipped"] == [3]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the bad update never happened


# ----------------------------------------------------------------------------- through the CLI


def run_cli(run_dir, *overrides, env=None):
    layout = [] if any(o.startswith("parallel=") for o in overrides) else ["parallel=single"]
    return subprocess.run(
        [sys.executable, "-m", "moepipe.train", *layout, *SMALL, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=240, env={**CLEAN, **(env or {})},
    )


def cli_error(proc, code: int, *parts: str) -> None:
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moepipe:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    one_line(lines[0], *parts)


@pytest.mark.timeout(300)
def test_cli_exit_codes(saved_run, tmp_path):
    topo = tmp_path / "conf" / "topology"
    topo.mkdir(parents=True)
    (topo / "mine.yaml").write_text("name: mine\nnodes: 1\ndevice_groups:\n  - {count: 4, name: cpu\n")
    proc = run_cli(tmp_path / "a", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "topology=mine")
    cli_error(proc, 2, "topology=mine reads", "mine.yaml, which is not valid YAML (line", "fix the file")

    proc = run_cli(tmp_path / "b", "parallel=pp2_ep2", env={"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3"})
    cli_error(proc, 2, "torchrun started WORLD_SIZE=3")

    run = copy_run(saved_run, tmp_path)
    (run / "summary.json").unlink()
    shard = next(p for p in (run / "ckpt" / "step_2").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    proc = run_cli(run, "train.steps=4")
    cli_error(proc, 2, "is corrupt")
    assert not (run / "summary.json").exists()

    proc = run_cli(tmp_path / "c", "optim.lr=1e30", "optim.warmup_steps=0", "train.steps=4")
    cli_error(proc, 1, "train.on_nonfinite=stop", "at step 1", "train.on_nonfinite=skip")
    assert not (tmp_path / "c" / "summary.json").exists()


# --------------------------------------------------------------------------- one GPU, many workers


@pytest.mark.parametrize(
    "overrides,cuda,gpus,expect",
    [
        ([], False, 0, ("cpu", "gloo", None)),  # a CPU machine
        ([], True, 4, ("cuda", "nccl", None)),  # a GPU per worker
        ([], True, 1, ("cpu", "gloo", "NCCL needs one GPU per worker: this job runs on CPU with gloo")),  # make demo on one GPU
        (["parallel.backend=gloo"], True, 4, ("cpu", "gloo", "gloo cannot move CUDA tensors")),
        (["train.device=cuda"], True, 1, "4 workers on a node with 1 GPU(s): NCCL needs one GPU per worker; use parallel=single"),
        (["parallel.backend=nccl"], True, 2, "4 workers on a node with 2 GPU(s)"),
        (["train.device=cuda"], False, 0, "train.device=cuda but no CUDA device is visible"),
        (["parallel.backend=nccl"], False, 0, "parallel.backend=nccl but no GPU is used"),
    ],
)
def test_workers_never_share_a_gpu_under_nccl(overrides, cuda, gpus, expect):
    """The default pp2 x ep2 job (4 workers) on a machine with fewer GPUs than workers either runs
    on CPU/gloo with one line saying so (device and backend both auto) or stops with one line
    naming the fix; it never puts two NCCL ranks on one GPU."""
    from moepipe.train.launch import resolve_backend

    cfg = compose_cfg(overrides, single_process=False)
    if isinstance(expect, str):
        with pytest.raises(ConfigError) as err:
            resolve_backend(cfg, 4, cuda, gpus)
        one_line(str(err.value), expect)
        return
    device, backend, notice = resolve_backend(cfg, 4, cuda, gpus)
    assert (device, backend) == expect[:2]
    if expect[2] is None:
        assert notice is None
    else:
        one_line(notice, expect[2])


def test_single_process_names_the_schedule_it_does_not_run():
    from moepipe.train.launch import single_process_notices

    assert single_process_notices(compose_cfg(["schedule=1f1b"])) == []
    (line,) = single_process_notices(compose_cfg(["schedule=interleaved_1f1b", "schedule.microbatches=4"]))
    one_line(line, "moepipe (one process): schedule.name=interleaved_1f1b has no effect", "schedule.microbatches=4")
    assert single_process_notices(compose_cfg(["schedule=pipedream_2bw"])) == []  # its delayed update does apply
