"""Placers: pure functions from (topology, model spec, statistics) to a Plan, the simulator's
prediction of a plan, the cost of migrating between plans, and the re-planning decision.

    static           even layer split, contiguous expert blocks
    balance_by_time  min-max layer partition of measured/modelled block times (speed-weighted); experts static
    eplb             layers static; DeepSeek EPLB expert replication + balanced packing (hierarchical across nodes)
    topo             joint layer partition + speed/node-aware expert placement on the simulated time (topo.py)

`placer.name` may also name a plug-in (moepipe.plugins: an import path, a registered name or an
entry point); every placer, built-in or not, has the interface of moepipe.plugins.interfaces
and its plans pass the same checks here. No process group is needed; the runtime calls
`decide` between steps.
"""
from __future__ import annotations

import gc
import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np

from moepipe.config import ConfigError
from moepipe.placement.plan import Plan, mesh_coords, stage_assignment, validate_plan
from moepipe.placement.placers import baselines, robust
from moepipe.placement.placers.blas import one_blas_thread
from moepipe.placement.placers.evaluate import Evaluation, Evaluator
from moepipe.placement.placers.inputs import PlacementInputs, effective_cost_model, inputs_from_config, load_fractions, origins_of, routing_of
from moepipe.placement.placers.migration import migration_bytes, migration_time_s

__all__ = [
    "Decision", "Evaluator", "PlacementInputs", "check_memory", "decide", "inputs_from_config", "load_fractions",
    "make_placement", "migration_bytes", "migration_time_s", "predict_iteration_time", "realised_efficiency",
]

EFFICIENCY_FLOOR = 0.1  # a large enough predicted saving can always still justify a move


def check_memory(plan: Plan, ev: Evaluator, name: str, replica_slots: int, res: Optional[Evaluation] = None) -> Evaluation:
    """Raise ConfigError (one line) unless parameters + AdamW state + activation peak fit every device."""
    res = ev.evaluate(plan) if res is None else res
    need = res.memory_bytes
    over = need - ev.mem
    if (over > 0).any():
        r = int(np.argmax(over))
        p, e, d = mesh_coords(r, plan.pp, plan.ep, plan.dp)
        dev = ev.topo.devices[r]
        rep = f" placer.replica_slots={replica_slots}" if replica_slots else ""
        raise ConfigError(
            f"placer.name={name}{rep} needs {need[r] / 1e9:.1f} GB on rank {r} (pp={p} ep={e} dp={d}, {dev.name} with "
            f"{dev.memory_bytes / 1e9:.1f} GB: parameters+AdamW {res.param_bytes[r] / 1e9:.1f} GB, activations {res.act_bytes[r] / 1e9:.1f} GB): "
            "use more pipeline/expert ranks (parallel.pp, parallel.ep), smaller microbatches (raise schedule.microbatches), "
            "train.activation_checkpointing=true" + (" or fewer replica slots" if replica_slots else "")
        )
    return res


@contextmanager
def gc_paused():
    """A solve allocates many small short-lived lists, which trigger cyclic collections; with
    torch imported each full collection walks a large heap (about a fifth of a 1,024-device
    solve). The solve makes no reference cycles worth collecting, so collection waits until it ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def make_placement(name, inputs: PlacementInputs, replica_slots: int = 0, current: Optional[Plan] = None,
                   evaluator: Optional[Evaluator] = None, compare_layouts: bool = False) -> Plan:
    """The plan placer `name` chooses for `inputs`; valid, within memory, stage -> pp rank fixed
    by the schedule. `current` (optional) is a candidate topo keeps on ties (no churn). `name` is
    a placer's name (moepipe.plugins) or the placer function itself. plan.meta carries the
    all-to-all bytes per iteration by link class (`a2a_bytes_intra_node`, `a2a_bytes_inter_node`);
    `compare_layouts`: also solve under the other EP group layout and report which is faster in
    plan.meta["ep_layout"] (layout.py; the plan stays in the runtime's rank order)."""
    from moepipe.plugins.registry import resolve

    placer = resolve("placer", name) if isinstance(name, str) else name
    name = name if isinstance(name, str) else getattr(name, "__name__", repr(name))
    if replica_slots < 0:
        raise ConfigError(f"placer.replica_slots={replica_slots} must be >= 0: extra expert slots per EP rank")
    with gc_paused(), one_blas_thread():
        plan = _make_placement(name, placer, inputs, replica_slots, current, evaluator)
        if compare_layouts:
            from moepipe.placement.placers.layout import compare_ep_layouts

            report = compare_ep_layouts(placer, inputs, replica_slots, runtime_plan=plan)
            if report is not None:
                plan.meta["ep_layout"] = report
        return plan


# The built-in placers under the plug-in interface (moepipe.plugins.interfaces); each takes the
# caller's Evaluator when given one, so a re-plan simulates with one shared cache.


def static_placer(inputs: PlacementInputs, replica_slots: int, current: Optional[Plan], evaluator: Optional[Evaluator] = None) -> Plan:
    return baselines.static(inputs)


def balance_by_time_placer(inputs: PlacementInputs, replica_slots: int, current: Optional[Plan], evaluator: Optional[Evaluator] = None) -> Plan:
    return baselines.balance_by_time(evaluator or Evaluator(inputs))


def eplb_placer(inputs: PlacementInputs, replica_slots: int, current: Optional[Plan], evaluator: Optional[Evaluator] = None) -> Plan:
    return baselines.eplb(evaluator or Evaluator(inputs), replica_slots)


def topo_placer(inputs: PlacementInputs, replica_slots: int, current: Optional[Plan], evaluator: Optional[Evaluator] = None) -> tuple[Plan, dict]:
    from moepipe.placement.placers.topo import topo

    return topo(evaluator or Evaluator(inputs), replica_slots, current)


def _takes_evaluator(placer) -> bool:
    try:
        return "evaluator" in inspect.signature(placer).parameters
    except (TypeError, ValueError):  # a callable without an inspectable signature
        return False


def _make_placement(name: str, placer, inputs: PlacementInputs, replica_slots: int, current: Optional[Plan],
                    evaluator: Optional[Evaluator]) -> Plan:
    t0 = time.perf_counter()
    ev = Evaluator(inputs) if evaluator is None else evaluator
    out = placer(inputs, replica_slots, current, evaluator=ev) if _takes_evaluator(placer) else placer(inputs, replica_slots, current)
    plan, info = out if isinstance(out, tuple) else (out, {})
    if not isinstance(plan, Plan):
        raise ConfigError(f"placer.name={name} returned {type(plan).__name__}, not a Plan: a placer maps (inputs, replica_slots, current) to a Plan")
    spec = inputs.spec
    validate_plan(plan, spec.n_layers, spec.moe_layers, spec.num_experts if spec.moe_layers else None)
    expected = stage_assignment(inputs.pp, inputs.virtual_stages, inputs.style)
    if plan.stage_to_pp_rank != expected:
        raise ConfigError(f"placer.name={name} put stages on pp ranks {plan.stage_to_pp_rank}, but schedule.name={inputs.schedule} "
                          f"fixes {expected}: keep stage_assignment(pp, virtual_stages, inputs.style)")
    res = check_memory(plan, ev, name, replica_slots, info.get("evaluation"))
    solve = time.perf_counter() - t0
    meta = dict(plan.meta) | {"placer": name, "style": inputs.style, "replica_slots": int(replica_slots),
                              "predicted_s": res.iteration_time_s, "solve_time_s": solve} | ev.traffic(plan)
    if info:
        meta["candidates_s"] = info.get("candidates", {})
        meta["boundary_evals"] = info.get("boundary_evals", 0)
    return Plan(plan.stage_layers, plan.stage_to_pp_rank, plan.expert_map, plan.pp, plan.ep, plan.dp, meta)


def predict_iteration_time(plan: Plan, inputs: PlacementInputs) -> float:
    """moepipe.sim.simulate's iteration time for the plan under the inputs' routing, token origins and layer times."""
    from moepipe.sim import simulate

    res = simulate(plan, inputs.schedule, inputs.microbatches, inputs.topology, effective_cost_model(inputs), routing_of(inputs),
                   origins=origins_of(inputs))
    return float(res.iteration_time_s)


@dataclass
class Decision:
    plan: Plan  # the plan to run next: the new one when migrating, else the current one
    migrate: bool
    predicted_old_s: float
    predicted_new_s: float
    predicted_gain_s: float  # (old - new) * horizon_steps
    migration_cost_s: float
    bytes_moved: int
    solve_time_s: float
    reason: str
    candidate: Optional[Plan] = None  # what the placer proposed (also when not migrating)
    traffic_old: Optional[dict] = None  # all-to-all bytes per iteration by link class, current plan (Evaluator.traffic)
    traffic_new: Optional[dict] = None  # the same for the proposed plan


def decide(name: str, inputs: PlacementInputs, current: Plan, replica_slots: int, horizon_steps: int, min_gain_frac: float = 0.02,
           shadow_slots: int = 0) -> Decision:
    """Re-plan and migrate only when the predicted saving over the next `horizon_steps` exceeds
    the migration time AND the per-step saving exceeds `min_gain_frac` of the current time
    (hysteresis: noise and short bursts in an EMA'd load do not cause churn).
    `shadow_slots` > 0 (the runtime shadows hot experts every step, placer.shadow_slots): both
    plans are scored as they will run, with the shadows the runtime picks for the load
    (moepipe.placement.shadow_eval.time_with_shadows), so a move the fast path already makes
    unnecessary shows no gain."""
    t0 = time.perf_counter()
    ev = Evaluator(inputs)
    new = make_placement(name, inputs, replica_slots, current, evaluator=ev)
    solve = time.perf_counter() - t0
    if shadow_slots > 0:
        from moepipe.placement.shadow_eval import time_with_shadows  # same layer; it imports placers.evaluate

        score = robust.scorer(inputs, ev, lambda e, p: time_with_shadows(e, p, shadow_slots))
        old_s, new_s = score(current), score(new)
    elif robust.is_robust(inputs):  # placer.objective over the load scenarios, for both plans
        score = robust.scorer(inputs, ev)
        old_s, new_s = score(current), score(new)
    else:
        old_s = ev.evaluate(current).iteration_time_s
        new_s = float(new.meta.get("predicted_s", ev.evaluate(new).iteration_time_s))
    gain = (old_s - new_s) * horizon_steps
    moved = migration_bytes(current, new, inputs)
    cost = migration_time_s(current, new, inputs)
    frac = (old_s - new_s) / old_s if old_s > 0 else 0.0
    if moved.sum() == 0 and new.stage_layers == current.stage_layers:
        ok, why = False, "the placer keeps the current layout"
    elif frac <= min_gain_frac:
        ok, why = False, f"saving {frac:.2%} per step <= min_gain_frac {min_gain_frac:.2%}"
    elif gain <= cost:
        ok, why = False, f"gain {gain:.3g} s over {horizon_steps} steps <= migration {cost:.3g} s"
    else:
        ok, why = True, f"gain {gain:.3g} s over {horizon_steps} steps > migration {cost:.3g} s, saving {frac:.2%} per step"
    traffic_new = {k: new.meta[k] for k in ("a2a_bytes_intra_node", "a2a_bytes_inter_node") if k in new.meta} or ev.traffic(new)
    return Decision(new if ok else current, ok, old_s, new_s, gain, cost, int(moved.sum()), solve, why, new, ev.traffic(current), traffic_new)


def realised_efficiency(predicted_old_s: float, predicted_new_s: float, measured_before_s: float, measured_after_s: float) -> Optional[float]:
    """The share of a migration's predicted per-step saving that the measured step time showed:
    (1 - after/before) / (1 - new/old), clipped to [EFFICIENCY_FLOOR, 1] (never more trust than
    the model earns). None when the move predicted no saving or a time is missing. A cost model
    that overstates relative gains (fixed per-step overheads it does not model), or a load that
    moved on before the move paid off, shows up here as an efficiency below 1."""
    if not (predicted_old_s > predicted_new_s > 0 and measured_before_s and measured_after_s and measured_before_s > 0):
        return None
    realised = 1.0 - measured_after_s / measured_before_s
    predicted = 1.0 - predicted_new_s / predicted_old_s
    return float(min(1.0, max(EFFICIENCY_FLOOR, realised / predicted)))
