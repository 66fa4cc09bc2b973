"""spike: uniform routing, except every `burst_every` steps one expert per layer takes
(1 + strength) times the share of each other expert; the spiking expert moves on by one at
every spike (seeded per layer), so a placer that keeps the last layout is always one step late.

A workload is (step, layer, num_experts, ep, strength, period, burst_every, seed) -> p over
the experts: all > 0, summing to 1, deterministic in its arguments.
"""
from __future__ import annotations

import numpy as np


def spike(step: int, layer: int, num_experts: int, ep: int, strength: float, period: int, burst_every: int, seed: int) -> np.ndarray:
    w = np.ones(num_experts)
    if step % burst_every == 0:
        w[(seed + layer + step // burst_every) % num_experts] += strength
    return w / w.sum()
