"""Start the job's processes.

- one process: train in place;
- one node, several processes: spawn pp*ep*dp workers from inside the (single) Hydra job, so
  there is one run dir and one W&B run; the first worker to fail ends the job with its error;
- torchrun (many nodes), or SLURM with one task per rank (Hydra's submitit launcher): this
  process is one worker; rank 0's run dir is broadcast to all.
Collectives carry `parallel.collective_timeout_s`, so a lost peer ends the job instead of
hanging it.
"""
from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moepipe.config import MoepipeConfig, world_size
from moepipe.parallel.spawn import free_port


class WorkerFailed(RuntimeError):
    """A worker process raised or died; the message carries its error."""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ)


def slurm_tasks() -> tuple[int, int, int, str] | None:
    """(rank, world, local_rank, init_method) when SLURM runs one task per rank (submitit
    launcher with tasks_per_node = devices per node), else None."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return None
    import submitit  # the hydra-submitit-launcher dependency; gives the job's host list

    env = submitit.JobEnvironment()
    port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
    return env.global_rank, env.num_tasks, env.local_rank, f"tcp://{env.hostnames[0]}:{port}"


def launch(cfg: MoepipeConfig, run_dir: str) -> dict | None:
    """Run the job; return the summary where this process can read it."""
    n = world_size(cfg)
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != n:
            from moepipe.config import ConfigError

            raise ConfigError(
                f"parallel.pp*ep*dp={n} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']}: "
                "make nnodes*nproc_per_node equal pp*ep*dp"
            )
        return run_worker(int(os.environ["RANK"]), n, cfg, run_dir, "env://", int(os.environ.get("LOCAL_RANK", 0)))
    slurm = slurm_tasks() if n > 1 else None
    if slurm is not None:
        rank, tasks, local_rank, init = slurm
        if tasks != n:
            from moepipe.config import ConfigError

            raise ConfigError(f"parallel.pp*ep*dp={n} but SLURM runs {tasks} tasks: set nodes*tasks_per_node to pp*ep*dp")
        return run_worker(rank, n, cfg, run_dir, init, local_rank)
    if n == 1:
        from moepipe.train.loop import train

        return train(cfg, run_dir)
    os.makedirs(run_dir, exist_ok=True)
    init = f"tcp://127.0.0.1:{free_port()}"
    try:
        mp.start_processes(_spawned, args=(n, cfg, run_dir, init), nprocs=n, start_method="spawn", join=True)
    except mp.ProcessRaisedException as err:
        raise WorkerFailed(f"worker {err.error_index} failed:\n{err}") from None
    except mp.ProcessExitedException as err:
        raise WorkerFailed(f"worker {err.error_index} exited with code {err.exit_code} (signal {err.signal_name})") from None
    path = os.path.join(run_dir, "summary.json")
    with open(path) as f:
        return json.load(f)


def _spawned(rank: int, n: int, cfg: MoepipeConfig, run_dir: str, init: str) -> None:
    run_worker(rank, n, cfg, run_dir, init, local_rank=rank)


def _threads_per_worker(cfg: MoepipeConfig, local_world: int) -> int:
    if cfg.train.num_threads:
        return cfg.train.num_threads
    return max(1, (os.cpu_count() or 1) // max(1, local_world))


def run_worker(rank: int, n: int, cfg: MoepipeConfig, run_dir: str, init: str, local_rank: int = 0) -> dict | None:
    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer
    from moepipe.train.loop import train

    from moepipe.config import ConfigError

    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or n)
    if use_cuda:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
        if backend == "nccl" and gpus > 1 and local_world > gpus:
            raise ConfigError(f"{local_world} ranks on a node with {gpus} GPUs: NCCL needs one GPU per rank; lower parallel.pp*ep*dp or add nodes")
        torch.cuda.set_device(local_rank % gpus)
    elif backend == "nccl":
        raise ConfigError("parallel.backend=nccl but no GPU is used: set parallel.backend=gloo (or auto)")
    torch.set_num_threads(_threads_per_worker(cfg, local_world))
    timeout = timedelta(seconds=cfg.parallel.collective_timeout_s)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=n, timeout=timeout)
    ok = False
    try:
        shared = [run_dir]
        dist.broadcast_object_list(shared, src=0)  # under torchrun every rank's Hydra made its own dir
        run_dir = shared[0]
        mesh = build_mesh(cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.dp)
        summary = train(cfg, run_dir, trainer_factory=lambda: DistributedTrainer(cfg, mesh), is_metrics_rank=mesh.is_metrics_rank)
        dist.barrier()
        ok = True
        return summary
    finally:
        # Tear the group down explicitly on success: leaving it to interpreter exit lets gloo's
        # threads be destroyed after the runtime that owns them (abort at exit).
        if ok:
            dist.destroy_process_group()
