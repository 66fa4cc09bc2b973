"""Run a function on N gloo processes with a hard deadline (a hung test fails, never hangs)."""
from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    ok = False
    try:
        fn(rank, world, *args)
        dist.barrier()
        ok = True
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if ok:
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 240.0) -> None:
    """fn(rank, world, *args) on `world` spawned processes; raises on any failure or timeout."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, start_method="spawn", join=False)
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
    exitcodes = [p.exitcode for p in ctx.processes]
    if any(code != 0 for code in exitcodes):
        raise RuntimeError(f"worker exit codes {exitcodes}")


def gather_state(modules, rank: int) -> dict | None:
    """Every rank's parameters by global name, merged on rank 0 (replicas must agree)."""
    local = {}
    for m in modules:
        for name, p in m.named_parameters():
            local[name] = p.detach().clone()
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    if rank != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in everything:
        for name, t in part.items():
            if name in merged:
                assert torch.equal(merged[name], t), f"replicas of {name} diverged"
            else:
                merged[name] = t
    return merged


def save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
