"""Synthetic expert-load patterns for placer studies: probabilities over experts per MoE layer
and step. Pure and deterministic in their arguments (numpy only).

Every distribution is strictly positive ("smooth"): the runtime injects a skew by adding
log(p * E) to the router logits, which needs no zeros, and a placer reading the counts sees
every expert. Definitions (s = strength, E = num_experts):

  none        uniform, p_e = 1/E
  zipf        p ~ 1/rank^s, the expert holding each rank shuffled per layer (by seed)
  hot_expert  one expert per layer (chosen per layer by seed) gets s times the share of each
              other expert: p_hot = s/(s + E - 1), others 1/(s + E - 1); s = 1 is uniform
  hot_rank    the experts EP rank 0 holds under the static contiguous blocks (the first
              ceil(E/ep)) each get s times the share of every other expert
  rotating    hot_expert whose hot expert moves to the next expert every `period` steps
  burst       uniform, except hot_expert on steps where step % burst_every == 0
  lognormal   p ~ exp(s * z), z ~ N(0, 1) per expert, drawn per layer (sigma = s); fixed over steps
  local_hot   origin skew: the experts, shuffled per layer (by seed), are cut into `ep` blocks
              and the data starting on EP rank r prefers block r (s times the share of every
              other expert); over all ranks the load is (near) uniform, so only where tokens
              start, not how many each expert gets, rewards a placement.

Each is a function with the workload plug-in signature (moepipe.plugins.interfaces), so
`workload.kind` may also name a user's own (pkg.module:attr, register(), an entry point).
A workload whose function also takes `source` (an EP rank, or None for the whole job) can
differ per source rank: the runtime asks each rank for its own (`source` = its EP rank) and
the simulator reads all of them as token origins (`origin_distribution`); the others give
every source the same distribution, so their numerics do not change.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from moepipe.config import ConfigError

WORKLOADS = ("none", "zipf", "hot_expert", "hot_rank", "rotating", "burst", "lognormal")  # the built-ins


def _rng(seed: int, layer: int, salt: int) -> np.random.Generator:
    # Independent, reproducible stream per (seed, layer, use): no global state.
    return np.random.default_rng([int(seed), int(layer), int(salt)])


def _hot(num_experts: int, hot: int, strength: float) -> np.ndarray:
    w = np.ones(num_experts)
    w[hot] = strength
    return w


def _hot_expert_of(seed: int, layer: int, num_experts: int) -> int:
    return int(_rng(seed, layer, 1).integers(num_experts))


# The built-in workloads: plug-in signature (moepipe.plugins.interfaces), weights normalised last.


def none(step, layer, num_experts, ep, strength, period, burst_every, seed) -> np.ndarray:
    return _normalised(np.ones(num_experts))


def zipf(step, layer, num_experts, ep, strength, period, burst_every, seed) -> np.ndarray:
    return _normalised(_rng(seed, layer, 2).permutation(1.0 / np.arange(1, num_experts + 1) ** strength))


def hot_expert(step, layer, num_experts, ep, strength, period, burst_every, seed) -> np.ndarray:
    return _normalised(_hot(num_experts, _hot_expert_of(seed, layer, num_experts), strength))


def hot_rank(step, layer, num_experts, ep, strength, period, burst_every, seed) -> np.ndarray:
    w = np.ones(num_experts)
    w[: -(-num_experts // min(ep, num_experts))] = strength  # static_plan gives rank 0 the first ceil(E/ep) experts
    return _normalised(w)


def rotating(step, layer, num_experts, ep, strength, period, burst_every, seed) -> np.ndarray:
    return _normalised(_hot(num_experts, (_hot_expert_of(seed, layer, num_experts) + step // period) % num_experts, strength))


def burst(step, layer, num_experts, ep, strength, period, burst_every, seed) -> np.ndarray:
    if step % burst_every:
        return none(step, layer, num_experts, ep, strength, period, burst_every, seed)
    return hot_expert(step, layer, num_experts, ep, strength, period, burst_every, seed)


def lognormal(step, layer, num_experts, ep, strength, period, burst_every, seed) -> np.ndarray:
    return _normalised(np.exp(strength * _rng(seed, layer, 3).standard_normal(num_experts)))


def local_hot(step, layer, num_experts, ep, strength, period, burst_every, seed, source=None) -> np.ndarray:
    if source is None:  # the whole job: every source's data in equal parts
        return np.mean([local_hot(step, layer, num_experts, ep, strength, period, burst_every, seed, r) for r in range(ep)], 0)
    blocks = np.array_split(_rng(seed, layer, 4).permutation(num_experts), ep)
    w = np.ones(num_experts)
    w[blocks[int(source) % ep]] = strength
    return _normalised(w)


@lru_cache(maxsize=None)
def _takes_source(fn) -> bool:
    try:
        return "source" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _normalised(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def expert_distribution(
    kind: str,
    step: int,
    layer: int,
    num_experts: int,
    ep: int = 1,
    strength: float = 1.0,
    period: int = 50,
    burst_every: int = 10,
    seed: int = 0,
    source: Optional[int] = None,
) -> np.ndarray:
    """Probabilities over the `num_experts` experts of MoE layer `layer` at `step` (sum 1, all > 0)
    from workload `kind`: a built-in above, an import path or a registered plug-in. `source`:
    the EP rank the tokens start on (None: the whole job); only workloads taking `source` use it."""
    from moepipe.plugins.registry import resolve

    E = int(num_experts)
    fn = resolve("workload", kind, field="workload kind")
    if E < 1:
        raise ConfigError(f"workload num_experts={num_experts} must be >= 1: give the model's moe.num_experts")
    if not np.isfinite(strength) or strength <= 0:
        raise ConfigError(f"workload strength={strength} must be a finite number > 0: e.g. 1.0 (zipf exponent, hot factor, sigma)")
    if period < 1 or burst_every < 1 or ep < 1:
        raise ConfigError(f"workload period={period}/burst_every={burst_every}/ep={ep} must be >= 1: use positive integers")
    if source is not None and not 0 <= int(source) < ep:
        raise ConfigError(f"workload source={source} must be an EP rank in [0, {ep}): pass the rank's mesh.ep_rank")
    if _takes_source(fn):
        return fn(step, layer, E, ep, strength, period, burst_every, seed, source=source)
    return fn(step, layer, E, ep, strength, period, burst_every, seed)


def origin_distribution(kind: str, step: int, layer: int, num_experts: int, ep: int = 1, **kw) -> np.ndarray:
    """[ep, E]: row r = the distribution of the tokens starting on EP rank r (all rows equal for
    workloads that do not take `source`)."""
    return np.stack([expert_distribution(kind, step, layer, num_experts, ep=ep, source=r, **kw) for r in range(ep)])


def routing_origins(
    kind: str, step: int, moe_layers: Sequence[int], num_experts: int, tokens: float, top_k: int, ep: int = 1, **kw
) -> dict[int, np.ndarray]:
    """Expected assignments per (source EP rank, expert) for each MoE layer, `tokens` spread evenly
    over the sources: the simulator's `origins` (their column sums are `routing_counts`' counts
    when every source's data is alike)."""
    return {int(l): origin_distribution(kind, step, int(l), num_experts, ep=ep, **kw) * tokens * top_k / ep for l in moe_layers}


def routing_counts(
    kind: str, step: int, moe_layers: Sequence[int], num_experts: int, tokens: float, top_k: int, **kw
) -> dict[int, np.ndarray]:
    """Expected token-expert assignments per expert for each MoE layer: p * tokens * top_k."""
    return {int(l): expert_distribution(kind, step, int(l), num_experts, **kw) * tokens * top_k for l in moe_layers}
