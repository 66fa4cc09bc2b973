"""Start the job's processes.

- one process: train in place;
- one node, several processes: spawn pp*ep*dp workers from inside the (single) Hydra job, so
  there is one run dir and one W&B run; the first worker to fail ends the job with its error;
- torchrun (many nodes), or one submitit task per rank (Hydra's submitit launchers: SLURM, or
  submitit_local on one machine): this process is one worker; rank 0's run dir is broadcast to
  all, and the dirs other workers' Hydra made (torchrun) are removed while still empty.
Collectives carry `parallel.collective_timeout_s`, so a lost peer ends the job instead of
hanging it.

Restarts (`train.max_restarts`, this launcher only): when a worker dies or raises anything but
a configuration error or a non-finite loss, all workers are stopped and respawned; they resume
from the latest checkpoint. SIGTERM is passed on to the workers, which finish the step, save and
exit with EXIT_PREEMPTED. Under torchrun, `--max-restarts` plays this role (see
docs/ARCHITECTURE.md: the run dir must be fixed so the restarted workers find the checkpoints).
"""
from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import sys
import threading
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moepipe.config import ConfigError, MoepipeConfig, world_size
from moepipe.parallel.spawn import adopt_environment, free_port, worker_start_method


class WorkerFailed(RuntimeError):
    """A worker process raised or died; the message carries its error. Restartable: errors a
    restart would only repeat (configuration, non-finite loss) are raised as themselves."""


# Fault-injection variables that fire in the first attempt only (a restart must not re-inject).
FIRST_ATTEMPT_ONLY = ("MOEPIPE_INJECT_FAULT", "MOEPIPE_INJECT_SIGTERM")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ)


def slurm_tasks() -> tuple[int, int, int, str] | None:
    """(rank, world, local_rank, init_method) when submitit runs one task per rank: on SLURM
    (hydra/launcher=slurm, tasks_per_node = devices per node) or on this machine through its
    local executor (hydra/launcher=submitit_local: the same tasks without a cluster), else None.
    The store is at $MASTER_ADDR:$MASTER_PORT where set, else on the job's first host (local:
    127.0.0.1) at a port derived from the job id, the same for every task of the job."""
    on_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ
    local = int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1 and "SUBMITIT_LOCAL_GLOBALID" in os.environ
    if not (on_slurm or local):
        return None
    import submitit  # the hydra-submitit-launcher dependency: ranks and the job's host list

    env = submitit.JobEnvironment()
    host = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if local else env.hostnames[0])
    job = int(re.sub(r"\D", "", str(env.raw_job_id)) or 0)
    port = int(os.environ.get("MASTER_PORT") or 20000 + job % 20000)
    return env.global_rank, env.num_tasks, env.local_rank, f"tcp://{host}:{port}"


def resolve_backend(cfg: MoepipeConfig, local_world: int, cuda_available: bool, gpu_count: int) -> tuple[str, str, str | None]:
    """(device type, process-group backend, notice or None) for a multi-process job with
    `local_world` ranks on this node. NCCL needs one GPU per rank: with fewer GPUs, an `auto`
    job falls back to CPU/gloo and says so in one line; an explicit cuda/nccl job stops with a
    one-line ConfigError naming the fix. Pure: the launcher and every worker derive the same answer."""
    par, t = cfg.parallel, cfg.train
    want_cuda = t.device == "cuda" or (t.device == "auto" and cuda_available)
    if t.device == "cuda" and not cuda_available:
        raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    if not want_cuda:
        if par.backend == "nccl":
            raise ConfigError("parallel.backend=nccl but no GPU is used: set parallel.backend=gloo (or auto)")
        return "cpu", "gloo", None
    if par.backend == "gloo":  # train.device=auto (config validation rejects gloo with an explicit cuda)
        return "cpu", "gloo", "moepipe: parallel.backend=gloo: the workers run on CPU (gloo cannot move CUDA tensors between pipeline stages)"
    if local_world > gpu_count:
        fix = f"use parallel=single to train on one GPU, or lower parallel.pp*ep*dp to {gpu_count} per node, or add nodes"
        if t.device == "auto" and par.backend == "auto":
            return "cpu", "gloo", (
                f"moepipe: {local_world} workers on this node but {gpu_count} GPU(s), and NCCL needs one GPU per worker: "
                f"this job runs on CPU with gloo ({fix}; train.device=cuda stops instead)"
            )
        raise ConfigError(f"{local_world} workers on a node with {gpu_count} GPU(s): NCCL needs one GPU per worker; {fix}, or set train.device=cpu")
    return "cuda", "nccl", None


def _on_cpu(cfg: MoepipeConfig) -> MoepipeConfig:
    return replace(cfg, train=replace(cfg.train, device="cpu"), parallel=replace(cfg.parallel, backend="gloo"))


def launch(cfg: MoepipeConfig, run_dir: str) -> dict | None:
    """Run the job; return the summary where this process can read it."""
    n = world_size(cfg)
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != n:
            raise ConfigError(
                f"parallel.pp*ep*dp*tp={n} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']}: "
                "make nnodes*nproc_per_node equal pp*ep*dp*tp"
            )
        return run_worker(int(os.environ["RANK"]), n, cfg, run_dir, "env://", int(os.environ.get("LOCAL_RANK", 0)))
    slurm = slurm_tasks() if n > 1 else None
    if slurm is not None:
        rank, tasks, local_rank, init = slurm
        if tasks != n:
            raise ConfigError(f"parallel.pp*ep*dp*tp={n} but SLURM runs {tasks} tasks: set nodes*tasks_per_node to pp*ep*dp*tp")
        return run_worker(rank, n, cfg, run_dir, init, local_rank)
    preflight(cfg, run_dir)
    for line in single_process_notices(cfg) if n == 1 else ():
        print(line, file=sys.stderr, flush=True)
    if n > 1:
        device, _, notice = resolve_backend(cfg, n, torch.cuda.is_available(), torch.cuda.device_count())
        if notice:
            print(notice, file=sys.stderr, flush=True)
        if device == "cpu":
            cfg = _on_cpu(cfg)
    if n == 1 and cfg.train.max_restarts == 0:
        from moepipe.train.loop import train

        return train(cfg, run_dir)
    os.makedirs(run_dir, exist_ok=True)
    attempt = 0
    while True:
        os.environ["MOEPIPE_RESTART"] = str(attempt)
        try:
            _run_workers(cfg if attempt == 0 else _resume_config(cfg, run_dir), run_dir, n)
            break
        except WorkerFailed as err:
            if attempt >= cfg.train.max_restarts:
                raise
            attempt += 1
            print(f"moepipe: {str(err).splitlines()[0]}; restart {attempt}/{cfg.train.max_restarts} from the latest checkpoint",
                  file=sys.stderr, flush=True)
            for name in FIRST_ATTEMPT_ONLY:
                os.environ.pop(name, None)
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def single_process_notices(cfg: MoepipeConfig) -> list[str]:
    """One line for each pipeline option that one process does not use, so a sweep over it is
    never mistaken for a comparison: one process accumulates gradients over
    schedule.microbatches, the arithmetic every schedule performs."""
    from moepipe.train.optim import delayed_update

    sch, out = cfg.schedule, []
    if delayed_update(sch.name):  # PipeDream-2BW's one-step delay applies in one process too
        return out
    if sch.name != "1f1b" or sch.virtual_stages > 1:
        out.append(
            f"moepipe (one process): schedule.name={sch.name} has no effect (parallel.pp*ep*dp=1): gradients accumulate over "
            f"schedule.microbatches={sch.microbatches}, the arithmetic every schedule performs; use parallel.pp>1 to run the schedule"
        )
    return out


def preflight(cfg: MoepipeConfig, run_dir: str) -> None:
    """Checks that need the file system or the simulator, made once before any worker starts
    (each raises a one-line ConfigError): the data file, the schedule's program (a CSV table or
    an order function: every backward present, sends matched, no deadlock) and the checkpoint
    to resume from."""
    d = cfg.data
    if d.name == "memmap" and d.path and not os.path.isfile(d.path):
        raise ConfigError(f"data.path={d.path} does not exist: check the path or make it with moepipe-make-memmap --out {d.path} FILES...")
    sch = cfg.schedule
    if world_size(cfg) > 1 and cfg.parallel.pp > 1 and sch.executor == "moepipe":
        from moepipe.sim.schedules import schedule_program

        schedule_program(sch.name, cfg.parallel.pp, sch.virtual_stages, sch.microbatches)
    from moepipe.train.checkpoint import find_resume

    find_resume(cfg, run_dir)


def _resume_config(cfg: MoepipeConfig, run_dir: str) -> MoepipeConfig:
    """A restart continues this job's own checkpoints (resume=auto) once it has written one;
    before that it starts where the first attempt did."""
    from moepipe.train.checkpoint import checkpoint_root, latest_checkpoint

    if latest_checkpoint(checkpoint_root(cfg, run_dir)) is None:
        return cfg
    return replace(cfg, train=replace(cfg.train, resume="auto"))


def _classify(index: int, trace: str) -> Exception:
    """Turn a worker's traceback into the parent's error: its own one-line ConfigError or
    non-finite loss (deterministic: a restart would fail again), else a restartable failure."""
    last = next((line for line in reversed(trace.strip().splitlines()) if line.strip()), "")
    match = re.match(r"^([\w.]+): (.*)$", last)
    if match:
        kind, message = match.group(1).rsplit(".", 1)[-1], match.group(2)
        if kind == "ConfigError":
            return ConfigError(message)
        if kind == "NonFiniteLossError":
            from moepipe.train.loop import NonFiniteLossError

            return NonFiniteLossError(message)
    return WorkerFailed(f"worker {index} failed:\n{trace}")


def _run_workers(cfg: MoepipeConfig, run_dir: str, n: int) -> None:
    """Spawn n workers and wait; SIGTERM to this process is passed on to them (they save and
    exit with EXIT_PREEMPTED). The first failure ends the others within a few seconds."""
    from moepipe.train.preempt import EXIT_PREEMPTED, Preempted

    init = f"tcp://127.0.0.1:{free_port()}"
    target = _spawned if n > 1 else _single
    ctx = mp.start_processes(target, args=(n, cfg, run_dir, init, dict(os.environ)), nprocs=n, start_method=worker_start_method(), join=False)

    stopping = []  # set once SIGTERM arrived: a worker that dies from it now is a stop, not a fault

    def forward(signum, frame):
        stopping.append(signum)
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() else None
    try:
        # A short grace period: after one worker fails the others are blocked in collectives with
        # SIGTERM only setting a flag, so they are killed rather than waited for.
        while not ctx.join(timeout=1.0, grace_period=2.0):
            pass
    except mp.ProcessRaisedException as err:
        raise _classify(err.error_index, str(err)) from None
    except mp.ProcessExitedException as err:
        # A worker still starting (before its handler is installed) dies of the forwarded
        # SIGTERM itself: that is the stop the scheduler asked for, never a reason to restart.
        if err.exit_code == EXIT_PREEMPTED or stopping:
            from moepipe.train.checkpoint import checkpoint_root, latest_checkpoint

            path = latest_checkpoint(checkpoint_root(cfg, run_dir)) or "(none)"
            raise Preempted(int(path.rsplit("_", 1)[-1]) if path[-1:].isdigit() else 0, path) from None
        raise WorkerFailed(f"worker {err.error_index} exited with code {err.exit_code} (signal {err.signal_name})") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when its parent dies (killed by a scheduler,
    an OOM killer or a test timeout), instead of leaving it to wait out the collective timeout.
    Under the fork server the parent is the server, which exits when the launcher does."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawned(rank: int, n: int, cfg: MoepipeConfig, run_dir: str, init: str, env: dict[str, str]) -> None:
    from moepipe.train.preempt import EXIT_PREEMPTED, Preempted

    adopt_environment(env)
    die_with_parent()
    try:
        run_worker(rank, n, cfg, run_dir, init, local_rank=rank)
    except Preempted:
        sys.exit(EXIT_PREEMPTED)  # the checkpoint is written; a distinct status, not a failure


def _single(rank: int, n: int, cfg: MoepipeConfig, run_dir: str, init: str, env: dict[str, str]) -> None:
    """One process under the restarting launcher (train.max_restarts > 0): the plain Trainer."""
    from moepipe.train.loop import train
    from moepipe.train.preempt import EXIT_PREEMPTED, Preempted

    adopt_environment(env)
    die_with_parent()
    torch.set_num_threads(_threads_per_worker(cfg, 1))
    try:
        train(cfg, run_dir)
    except Preempted:
        sys.exit(EXIT_PREEMPTED)


def _threads_per_worker(cfg: MoepipeConfig, local_world: int) -> int:
    if cfg.train.num_threads:
        return cfg.train.num_threads
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def drop_hydra_shell(own: str, job_dir: str) -> None:
    """Under torchrun every worker runs Hydra, which makes a run dir per worker (a timestamped
    one per start second); rank 0's is the job's. Remove this worker's own dir when it is
    another directory holding nothing but what Hydra put there (.hydra/*.yaml, an empty job
    log), so a job leaves one run dir. Anything else in it, and it stays."""
    try:
        if os.path.exists(job_dir) and os.path.samefile(own, job_dir):
            return
        names = os.listdir(own)
        hydra = os.path.join(own, ".hydra")
        logs = [n for n in names if n.endswith(".log")]
        if set(names) - {".hydra"} - set(logs) or any(os.path.getsize(os.path.join(own, n)) for n in logs):
            return
        if os.path.isdir(hydra) and any(not n.endswith(".yaml") for n in os.listdir(hydra)):
            return
    except OSError:
        return
    shutil.rmtree(own, ignore_errors=True)  # workers of one node may share the dir: both remove it


def mesh_for(cfg: MoepipeConfig):
    """The job's mesh (collective); with parallel.a2a=hierarchical also the node groups of EP
    groups that span nodes, the nodes being the topology's (rank r on r // devices_per_node)."""
    from moepipe.parallel.mesh import build_mesh

    par = cfg.parallel
    return build_mesh(par.pp, par.ep, par.dp, cfg.topology.devices_per_node if par.a2a == "hierarchical" else 0, tp=par.tp)


def run_worker(rank: int, n: int, cfg: MoepipeConfig, run_dir: str, init: str, local_rank: int = 0) -> dict | None:
    from moepipe.train.distributed import DistributedTrainer
    from moepipe.train.loop import train
    from moepipe.train.preempt import Preempted

    # ranks on this node: torchrun's LOCAL_WORLD_SIZE, SLURM's per-node task count (read as
    # placement.topology does, also in SLURM's "8(x2)" form, which int() refused), else all ranks
    per_node = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "")
    per_node = per_node.split("(")[0].split(",")[0].strip()
    local_world = int(per_node) if per_node.isdigit() and int(per_node) > 0 else n
    par = cfg.parallel
    if per_node and rank == 0 and par.a2a == "hierarchical" and local_world != min(cfg.topology.devices_per_node, n):
        print(f"moepipe: parallel.a2a=hierarchical groups ranks into nodes of topology.devices_per_node={cfg.topology.devices_per_node}, "
              f"but this job runs {local_world} per node: the results are the same, but the exchange's phases do not follow "
              "the machines (pick this cluster's topology)", file=sys.stderr, flush=True)
    device, backend, notice = resolve_backend(cfg, local_world, torch.cuda.is_available(), torch.cuda.device_count())
    if device == "cpu":
        if notice and rank == 0 and cfg.train.device != "cpu":  # torchrun/SLURM: this launcher did not print it
            print(notice, file=sys.stderr, flush=True)
        cfg = _on_cpu(cfg)
    else:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    torch.set_num_threads(_threads_per_worker(cfg, local_world))
    timeout = timedelta(seconds=cfg.parallel.collective_timeout_s)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=n, timeout=timeout)
    ok = False
    try:
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)  # under torchrun every rank's Hydra made its own dir
        if shared[0] != run_dir:
            drop_hydra_shell(run_dir, shared[0])
        run_dir = shared[0]
        mesh = mesh_for(cfg)
        # What is alive now (torch, numpy, Hydra, the config) lives as long as the worker: keep
        # it out of cyclic garbage collection, so the full collection after each migration
        # scans only what the run itself made (it took 0.34 of a 0.61 s migration otherwise)
        gc.collect()
        gc.freeze()
        try:
            summary = train(cfg, run_dir, trainer_factory=lambda plan: DistributedTrainer(cfg, mesh, plan), is_metrics_rank=mesh.is_metrics_rank)
        except Preempted:
            dist.barrier()  # every rank saved and agreed to stop: leave together
            ok = True
            raise
        dist.barrier()
        ok = True
        return summary
    finally:
        # Tear the group down explicitly on success: leaving it to interpreter exit lets gloo's
        # threads be destroyed after the runtime that owns them (abort at exit).
        if ok:
            dist.destroy_process_group()
