"""Measured forward time of every block a rank holds: the placer's per-layer statistics.

Pre/post forward hooks on each block (registered after any slow-device emulation, so an
emulated device's sleep counts like real slowness). Activation-checkpointing recomputes
are forwards too and count; that is time the stage really spends. On CUDA the hooks record
events (kernels run asynchronously: a host clock would measure launches), read once per
step in `take`.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


class BlockClock:
    def __init__(self, modules: list[nn.Module], n_layers: int, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self.seconds = np.zeros(n_layers)
        self.pending: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self.handles = []
        for module in modules:
            for block in module.layers.values():
                self.handles.append(block.register_forward_pre_hook(self._start))
                self.handles.append(block.register_forward_hook(self._stop))

    def _start(self, block: nn.Module, args: tuple) -> None:
        if self.cuda:
            block._clock_start = torch.cuda.Event(enable_timing=True)
            block._clock_start.record()
        else:
            block._clock_t0 = time.perf_counter()

    def _stop(self, block: nn.Module, args: tuple, out) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((block.layer_id, block._clock_start, end))
        else:
            self.seconds[block.layer_id] += time.perf_counter() - block._clock_t0

    def take(self) -> np.ndarray:
        """Seconds per block since the last call (zeros for blocks held elsewhere)."""
        if self.pending:
            torch.cuda.synchronize()
            for layer, start, end in self.pending:
                self.seconds[layer] += start.elapsed_time(end) / 1e3
            self.pending = []
        out, self.seconds = self.seconds, np.zeros_like(self.seconds)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
