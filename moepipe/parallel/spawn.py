"""Run a function on N local gloo processes with a hard deadline: for tests, benchmarks and
experiments that drive the runtime directly (training jobs use moepipe.train.launch)."""
from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# Modules every worker needs: the fork server imports them once and forks each worker from
# that warm process, instead of every spawned worker importing torch and moepipe anew
# (~3 CPU-seconds a worker; a 4-rank test paid ~12 CPU-s before doing anything).
WORKER_PRELOAD = ["torch", "torch.distributed.pipelining", "moepipe.train.distributed", "moepipe.train.loop", "moepipe.train.launch"]


def worker_start_method() -> str:
    """'forkserver' with the preload above where the platform has it, else 'spawn'. Never plain
    fork: the parent may hold threads (gloo, OpenMP) whose locks a forked child would inherit."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(WORKER_PRELOAD)
    return "forkserver"


def adopt_environment(env: dict[str, str]) -> None:
    """A forked worker inherits the fork server's environment, which is the launcher's as it was
    when the server started; take the launcher's current one (e.g. a fault-injection variable
    the launcher dropped before a restart), as a spawned worker would have."""
    if env != os.environ:
        os.environ.clear()
        os.environ.update(env)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, fn, args, env: dict[str, str]) -> None:
    adopt_environment(env)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    ok = False
    try:
        fn(rank, world, *args)
        dist.barrier()
        ok = True
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if ok:  # explicit teardown: gloo threads must not outlive the runtime at exit
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 240.0, threads: int = 1) -> None:
    """fn(rank, world, *args) on `world` spawned processes; raises on any failure or timeout."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), threads, fn, args, dict(os.environ)), nprocs=world, start_method=worker_start_method(), join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world}-process run did not finish in {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        for p in ctx.processes:
            p.join(5)
    codes = [p.exitcode for p in ctx.processes]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"worker exit codes {codes}")
