"""Helpers for multi-process tests (the spawner itself lives in moepipe.parallel.spawn)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moepipe.parallel.spawn import run_distributed  # noqa: F401  (re-exported for the tests)


def gather_state(modules, rank: int) -> dict | None:
    """Every rank's parameters by global name, merged on rank 0 (replicas must agree); TP
    shards (DTensors) are gathered whole first, a collective every rank runs in the same order."""
    from torch.distributed.tensor import DTensor

    local = {}
    for m in modules:
        for name, p in m.named_parameters():
            local[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
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
