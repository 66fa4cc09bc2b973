"""Calibrate the engine's per-action runtime cost from a measured compute-free schedule step.

A real pipeline runtime spends time on every action besides its compute: the schedule's own
bookkeeping, building, posting and completing the action's sends and receives, the stage
wrapper. `moepipe.train.profile.measure_schedule_overhead` runs the real schedule on stand-in
stages with the run's activation shapes and (almost) no compute; this module finds the
per-action overhead for which the engine, fed the same order and link costs with zero compute,
reproduces that measured step. The result goes to `simulate(..., action_overhead_s=...)`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from moepipe.sim import engine
from moepipe.sim.schedules import schedule_order


def fit_action_overhead(schedule: str, pp: int, virtual_stages: int, microbatches: int, measured_step_s: float,
                        send: Any = None, comp: Any = None, tol: float = 1e-7) -> float:
    """Seconds per action such that the engine's makespan of `schedule` with compute `comp`
    ([n_stages, 3], default zero) and transfers `send` ([n_stages], default free) equals
    `measured_step_s`. 0 when the engine already needs that long without any overhead."""
    order, s2r = schedule_order(schedule, pp, virtual_stages, microbatches)
    S = len(s2r)
    comp = np.zeros((S, 3)) if comp is None else np.asarray(comp, dtype=np.float64)
    send = np.zeros(S) if send is None else np.asarray(send, dtype=np.float64)
    a2a = np.zeros((S, 3))

    def makespan(o: float) -> float:
        return engine.run(order, s2r, microbatches, comp, a2a, send, o).makespan

    if makespan(0.0) >= measured_step_s:
        return 0.0
    # makespan grows monotonically (and at least by o) with o: bisection on [0, measured]
    lo, hi = 0.0, float(measured_step_s)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if makespan(mid) < measured_step_s:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def actions_per_rank(schedule: str, pp: int, virtual_stages: int, microbatches: int) -> list[int]:
    """Compute actions each pipeline rank runs per step (an overlapped F+B pair counts two)."""
    order, _ = schedule_order(schedule, pp, virtual_stages, microbatches)
    return [sum(2 if a.kind == "FB" else 1 for a in order[r]) for r in range(pp)]


def comm_cpu_per_action(schedule: str, pp: int, virtual_stages: int, microbatches: int, cpu_per_step: Any) -> list[float]:
    """Per-rank seconds per action of the communication backend's own threads (measured CPU
    seconds per step, e.g. by measure_schedule_overhead(cpu=...)). Where they share the cores
    that compute runs on (CPU ranks), this is taken from compute: add it to the per-action
    overhead. A compute-free null step hides it (its cores are otherwise idle)."""
    n = actions_per_rank(schedule, pp, virtual_stages, microbatches)
    cpu = np.broadcast_to(np.asarray(cpu_per_step, dtype=np.float64), (pp,))
    return [float(c) / max(k, 1) for c, k in zip(cpu, n)]
