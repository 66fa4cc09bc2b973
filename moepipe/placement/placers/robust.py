"""Robust plans (issue 15): a plan scored on the forecast's load scenarios, not on the mean alone.

`placer.objective`:
  mean      the iteration time at the mean load (what the placers always did)
  expected  the scenarios' weighted mean iteration time (Forecast.scenarios / weights)
  quantile  the weighted `placer.quantile` of the scenarios' iteration times (a high quantile
            hedges against the worst likely interval)

The inputs carry the scenarios (`PlacementInputs.scenarios`, one {moe layer: load} per scenario,
and `scenario_weights`); each scenario gets its own Evaluator (its cache), so a plan's score is
exactly the simulator's time under each scenario's routing. topo adds hedge candidates (packed on
the per-expert largest share any scenario gives, replica slots all used: copies of experts that
are hot in some scenario) and keeps the candidate with the best score; eplb on the mean stays a
candidate, so topo's score is never worse than eplb's.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np

from moepipe.config import OBJECTIVES, ConfigError
from moepipe.placement.plan import Plan
from moepipe.placement.placers.evaluate import Evaluator
from moepipe.placement.placers.inputs import PlacementInputs


def check_objective(objective: str, quantile: float) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"placer.objective={objective!r} is not one of {list(OBJECTIVES)}: pick one")
    if not 0 < float(quantile) <= 1:
        raise ConfigError(f"placer.quantile={quantile} must be in (0, 1]: e.g. 0.9 (the time 90% of the scenarios stay under)")


def weighted_quantile(t: np.ndarray, w: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative weight (values ascending) reaches q."""
    o = np.argsort(t, kind="stable")
    cum = np.cumsum(np.asarray(w, dtype=np.float64)[o])
    return float(t[o][min(int(np.searchsorted(cum, q * cum[-1] * (1 - 1e-12))), len(t) - 1)])


def scenario_inputs(inputs: PlacementInputs) -> list[PlacementInputs]:
    """One PlacementInputs per scenario (its load, no scenarios of its own)."""
    return [replace(inputs, expert_load=dict(s), scenarios=None, scenario_weights=None, objective="mean") for s in inputs.scenarios or []]


def is_robust(inputs: PlacementInputs) -> bool:
    check_objective(inputs.objective, inputs.quantile)
    return inputs.objective != "mean" and bool(inputs.scenarios)


def weights_of(inputs: PlacementInputs) -> np.ndarray:
    n = len(inputs.scenarios or [])
    w = np.full(n, 1.0 / max(n, 1)) if inputs.scenario_weights is None else np.asarray(inputs.scenario_weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or not w.sum() > 0:
        raise ConfigError(f"scenario_weights has shape {w.shape} or a negative entry: give {n} weights >= 0, one per scenario")
    return w / w.sum()


def evaluated_time(ev: Evaluator, plan: Plan) -> float:
    return ev.evaluate(plan).iteration_time_s


def scorer(inputs: PlacementInputs, ev: Evaluator, time_of: Callable[[Evaluator, Plan], float] = evaluated_time) -> Callable[[Plan], float]:
    """plan -> its score under the inputs' objective (seconds per iteration): `ev` (the mean
    load) for objective=mean or without scenarios, else the scenarios' expected time or quantile.
    `time_of(evaluator, plan)`: a plan's seconds under one evaluator's load (default: the
    Evaluator's iteration time; the re-plan decision passes the time with per-step shadows)."""
    if not is_robust(inputs):
        return lambda plan: time_of(ev, plan)
    evs = [Evaluator(s) for s in scenario_inputs(inputs)]
    w = weights_of(inputs)
    q = float(inputs.quantile)

    def score(plan: Plan) -> float:
        t = np.array([time_of(e, plan) for e in evs])
        return float(w @ t) if inputs.objective == "expected" else weighted_quantile(t, w, q)

    return score


def hedge_load(inputs: PlacementInputs) -> Optional[dict[int, np.ndarray]]:
    """Per MoE layer, each expert's largest share of the layer's load over the scenarios (the
    mean's share where larger), rescaled to the mean's total: a packing of this load gives a
    copy to every expert that is hot in some scenario."""
    if not inputs.scenarios:
        return None
    out = {}
    for l in inputs.spec.moe_layers:
        rows = [np.asarray(s[l], dtype=np.float64) for s in inputs.scenarios]
        if inputs.expert_load is not None:
            rows.append(np.asarray(inputs.expert_load[l], dtype=np.float64))
        share = np.max([r / r.sum() if r.sum() > 0 else np.full(len(r), 1.0 / len(r)) for r in rows], axis=0)
        total = float(np.asarray(inputs.expert_load[l]).sum()) if inputs.expert_load is not None else 1.0
        out[l] = share / share.sum() * total
    return out
