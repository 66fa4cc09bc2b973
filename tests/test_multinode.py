"""The multi-node launch paths, on this machine: a pp2 x ep2 job with the hierarchical
all-to-all over topology=local_cpu_2nodes (ranks 0-1 one node, 2-3 the other)

- as two torchrun agents (--nnodes=2 --nproc-per-node=2, c10d rendezvous on localhost), each
  agent one node (also pp1 x ep4, whose EP group spans both agents);
- as one task per rank through submitit (Hydra's submitit_local launcher: the tasks the SLURM
  preset, conf/hydra/launcher/slurm.yaml, runs on a cluster, here without one);

each writes one run dir whose metrics.jsonl has the same losses, bit for bit, as the same job
spawned by `moepipe-train` (same arithmetic: one thread per worker everywhere). Every command
runs in its own session and is killed as a group at its deadline, so nothing outlives a test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moepipe.parallel.spawn import free_port

BIN = Path(sys.executable).parent
JOB = [
    "model.n_layers=4", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.max_seq_len=16",
    "moe.expert_hidden=32", "train.batch_size=8", "train.seq_len=16", "train.steps=3", "train.log_every=1",
    "train.eval_batches=1", "train.eval_every=0", "data.max_bytes=200000", "schedule.microbatches=2", "logger=none",
    "logger.progress=none", "train.dtype=fp32", "placer=static", "parallel.collective_timeout_s=60",
    "parallel.dp=1", "parallel.a2a=hierarchical", "topology=local_cpu_2nodes",
]
# pp2 x ep2: each stage's EP pair inside one node (the exchange has its intra-node phase only);
# pp1 x ep4: every EP group spans both agents (both phases, the inter-node one between agents)
LAYOUTS = {"pp2_ep2": ["parallel.pp=2", "parallel.ep=2"], "pp1_ep4": ["parallel.pp=1", "parallel.ep=4"]}
TIMEOUT = 240  # seconds per job: ~20-35 s measured on 2 busy cores


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would make a child think it is already a worker."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("TORCHELASTIC_", "SLURM_", "SUBMITIT_", "MOEPIPE_INJECT"))}
    env.update(extra)
    return env


def run_together(cmds: list[list[str]], cwd: Path, env: dict[str, str], timeout: float = TIMEOUT) -> list[tuple[int, str]]:
    """Start the commands at once, each in its own session; wait for all; at the deadline kill
    every session's process group and fail. Returns (status, output) per command."""
    logs = [open(cwd / f"cmd{i}.log", "w+") for i in range(len(cmds))]
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
             for c, log in zip(cmds, logs)]
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{len(cmds)} command(s) did not finish in {timeout:.0f} s: {[' '.join(c[:3]) for c in cmds]}")
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
    out = []
    for p, log in zip(procs, logs):
        log.seek(0)
        out.append((p.returncode, log.read()))
        log.close()
    return out


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def run_dirs(root: Path) -> list[Path]:
    """Every directory under root holding something the job or Hydra wrote."""
    return sorted({p.parent for p in root.rglob("*") if p.is_file() and p.name in ("metrics.jsonl", "config.yaml") and
                   ".submitit" not in p.parts} - {root}, key=str)


def run_dir_of(path: Path) -> Path:
    return path.parent if path.name == ".hydra" else path


_spawned: dict[str, list] = {}


def spawned(layout: str, tmp_root: Path) -> list[tuple[int, float]]:
    """The reference: moepipe-train's own spawned workers on this node (once per layout)."""
    if layout not in _spawned:
        root = tmp_root / f"spawned_{layout}"
        root.mkdir()
        [(rc, out)] = run_together([[str(BIN / "moepipe-train"), *JOB, *LAYOUTS[layout], f"hydra.run.dir={root / 'run'}"]],
                                   root, clean_env())
        assert rc == 0, out[-3000:]
        got = losses(root / "run")
        assert [s for s, _ in got] == [1, 2, 3]
        _spawned[layout] = got
    return _spawned[layout]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multinode")


def _torchrun(tmp: Path, layout: str) -> list[tuple[int, str]]:
    port = free_port()
    agents = [[str(BIN / "torchrun"), "--nnodes=2", "--nproc-per-node=2", f"--node-rank={node}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=localhost:{port}", f"--rdzv-id=moepipe-{port}", "--max-restarts=0",
               "-m", "moepipe.train", *JOB, *LAYOUTS[layout]] for node in (0, 1)]
    # Hydra makes a run dir in every worker (per start second by default): give one agent's
    # workers another, so that the job must drop a worker's own dir whichever agent holds rank 0
    agents[1].append("hydra.run.dir=runs/agent1")
    return run_together(agents, tmp, clean_env())


@pytest.mark.timeout(3 * TIMEOUT + 60)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torchrun_two_agents_as_two_nodes(tmp_path, tmp_root, layout):
    results = _torchrun(tmp_path, layout)
    if any("Address already in use" in out for _, out in results):  # the free port was taken meanwhile: once more
        results = _torchrun(tmp_path, layout)
    for rc, out in results:
        assert rc == 0, out[-3000:]
    # every worker's Hydra made a run dir under the default runs/...; one is left, the job's
    dirs = {run_dir_of(d) for d in run_dirs(tmp_path / "runs")}
    assert len(dirs) == 1, dirs
    [run] = dirs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["config"]["parallel"]["a2a"] == "hierarchical"
    assert losses(run) == spawned(layout, tmp_root)


@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_submitit_tasks_one_per_rank(tmp_path, tmp_root):
    """hydra/launcher=submitit_local runs one task per rank, as the SLURM preset does on a
    cluster: the tasks find their ranks through submitit and meet at MASTER_PORT."""
    cmd = [str(BIN / "moepipe-train"), "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=4",
           "hydra.launcher.timeout_min=5", *JOB, *LAYOUTS["pp2_ep2"]]
    [(rc, out)] = run_together([cmd], tmp_path, clean_env(MASTER_PORT=str(free_port())))
    assert rc == 0, out[-3000:]
    dirs = {run_dir_of(d) for d in run_dirs(tmp_path / "runs")}
    assert len(dirs) == 1, dirs  # the sweep's one job: .../<time>/0
    [run] = dirs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 4  # one job of 4 ranks, not 4 jobs
    assert losses(run) == spawned("pp2_ep2", tmp_root)
    logs = sorted((run.parent / ".submitit").rglob("*_log.err"))
    assert len(logs) == 4, logs  # four tasks
