"""Run a function on N local gloo processes with a hard deadline: for tests, benchmarks and
experiments that drive the runtime directly (training jobs use moepipe.train.launch)."""
from __future__ import annotations

import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, fn, args) -> None:
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
    ctx = mp.start_processes(_entry, args=(world, free_port(), threads, fn, args), nprocs=world, start_method="spawn", join=False)
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
