"""Self-checks a plug-in author runs on their own code: the checks every built-in passes.

    from moepipe.plugins.conformance import check_placer
    check_placer("mypkg.placers:greedy")   # or the function itself

Each `check_*` takes a name (anything moepipe.plugins.resolve accepts) or the object, returns
the number of cases it checked, and raises ConformanceError (one line: the plug-in, the case,
what broke) on the first failure.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from moepipe.plugins.registry import import_path, resolve


class ConformanceError(AssertionError):
    """A plug-in broke its interface; the message names the plug-in, the case and the fault."""


def _load(kind: str, obj: Any) -> tuple[str, Any]:
    if isinstance(obj, str):
        return obj, resolve(kind, obj)
    return getattr(obj, "__name__", type(obj).__name__), obj


def _fail(label: str, case: str, what: str) -> None:
    raise ConformanceError(f"{label} [{case}]: {what}")


# ------------------------------------------------------------------ placers

# Small jobs on the default 4-device CPU topology: loop and V stage placement, pipeline only,
# expert parallel only and both, uniform and skewed load. (overrides, workload kind or None)
PLACER_CASES: dict[str, tuple[dict, Optional[str]]] = {
    "pp2-ep2-1f1b-uniform": ({"pp": 2, "ep": 2, "schedule": "1f1b", "virtual_stages": 1, "microbatches": 2}, None),
    "pp2-ep2-1f1b-zipf": ({"pp": 2, "ep": 2, "schedule": "1f1b", "virtual_stages": 1, "microbatches": 2}, "zipf"),
    "pp2-ep2-zbv-hot": ({"pp": 2, "ep": 2, "schedule": "zbv", "virtual_stages": 2, "microbatches": 4}, "hot_expert"),
    "pp1-ep4-gpipe-hot": ({"pp": 1, "ep": 4, "schedule": "gpipe", "virtual_stages": 1, "microbatches": 2}, "hot_expert"),
}


def placer_inputs(case: str):
    """The PlacementInputs of one conformance case (a validated config, no files, no processes)."""
    from moepipe.config import (MoEConfig, ModelConfig, MoepipeConfig, ParallelConfig, ScheduleConfig, TrainConfig,
                                moe_layer_ids, validate)
    from moepipe.placement.placers import inputs_from_config
    from moepipe.placement.workloads import routing_counts

    o, kind = PLACER_CASES[case]
    cfg = validate(MoepipeConfig(
        model=ModelConfig(n_layers=6, d_model=64, n_heads=4, ffn_hidden=128, max_seq_len=32),
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=64),
        parallel=ParallelConfig(pp=o["pp"], ep=o["ep"]),
        schedule=ScheduleConfig(name=o["schedule"], microbatches=o["microbatches"], virtual_stages=o["virtual_stages"]),
        train=TrainConfig(batch_size=16, seq_len=32),
    ))
    load = None
    if kind:
        load = routing_counts(kind, 0, moe_layer_ids(cfg.model, cfg.moe), 8, 16 * 32, 2, strength=3.0, ep=o["ep"], seed=1)
    return inputs_from_config(cfg, expert_load=load)


def _same_layout(a, b) -> bool:
    return (a.stage_layers, a.stage_to_pp_rank, a.expert_map, a.pp, a.ep, a.dp) == (b.stage_layers, b.stage_to_pp_rank, b.expert_map, b.pp, b.ep, b.dp)


def check_placer(placer: Any, replica_slots: tuple[int, ...] = (0, 1)) -> int:
    """Every case x replica_slots: a valid plan (moepipe.placement.plan.validate_plan: every block
    and expert covered), stage -> pp rank as the schedule fixes it, at most ceil(E/ep) +
    replica_slots experts per EP rank per layer, within device memory (check_memory); the same
    plan again for the same inputs (determinism); and a valid plan when given it as `current`."""
    from moepipe.config import ConfigError
    from moepipe.placement.placers import make_placement

    label, fn = _load("placer", placer)
    n = 0
    for case in PLACER_CASES:
        inputs = placer_inputs(case)
        E, ep = inputs.spec.num_experts, inputs.ep
        for slots in replica_slots:
            where = f"{case} replica_slots={slots}"
            try:
                plan = make_placement(fn, inputs, slots)
                again = make_placement(fn, inputs, slots)
                kept = make_placement(fn, inputs, slots, current=plan)
            except ConfigError as err:  # invalid plan, wrong stage placement, out of memory
                _fail(label, where, str(err))
            if not _same_layout(plan, again):
                _fail(label, where, "two calls with the same inputs gave different plans: a placer must be deterministic")
            cap = -(-E // ep) + slots
            for layer, experts in plan.expert_map.items():
                held = np.bincount([r for ranks in experts for r in ranks], minlength=ep)
                if held.max() > cap:
                    _fail(label, where, f"layer {layer} puts {held.max()} experts on EP rank {int(held.argmax())}, "
                          f"more than ceil(E/ep) + replica_slots = {cap} slots")
            if kept.n_layers != plan.n_layers:
                _fail(label, where, "the plan given `current` does not cover the model")
            n += 1
    return n


# ------------------------------------------------------------------ workloads

WORKLOAD_CASES = [  # (step, layer, num_experts, ep, strength, period, burst_every, seed)
    (0, 0, 8, 1, 1.0, 50, 10, 0), (7, 3, 16, 4, 4.0, 5, 5, 1), (120, 1, 16, 4, 0.5, 50, 10, 2),
    (10, 5, 64, 8, 2.0, 10, 10, 3), (3, 0, 1, 1, 1.0, 1, 1, 0), (9, 2, 6, 4, 8.0, 3, 3, 7),
]


def check_workload(workload: Any) -> int:
    """Probabilities of shape [num_experts], finite, all > 0, summing to 1, and the same array
    again for the same arguments (every rank and layout must see the same routing skew)."""
    label, fn = _load("workload", workload)
    for args in WORKLOAD_CASES:
        case = "step={} layer={} E={} ep={} strength={} period={} burst_every={} seed={}".format(*args)
        p = np.asarray(fn(*args), dtype=np.float64)
        E = args[2]
        if p.shape != (E,):
            _fail(label, case, f"returned shape {p.shape}, not ({E},)")
        if not np.isfinite(p).all() or (p <= 0).any():
            _fail(label, case, "returned a non-finite or non-positive probability: every expert needs p > 0 (the skew adds log p)")
        if not np.isclose(p.sum(), 1.0):
            _fail(label, case, f"probabilities sum to {p.sum():.6g}, not 1")
        if not np.array_equal(p, np.asarray(fn(*args), dtype=np.float64)):
            _fail(label, case, "two calls with the same arguments differ: a workload must be deterministic in its arguments")
    return len(WORKLOAD_CASES)


# ------------------------------------------------------------------ forecasters


def check_forecaster(forecaster: Any) -> int:
    """Called as `(history [T, E], horizon, decay)`: a mean of E finite loads >= 0 (and, when
    scenarios are given, [S, E] of them with weights >= 0 summing to 1 that average to the mean),
    the history left as it was, deterministic, and a steady load forecasts itself (mean and every
    scenario) for any horizon and decay in [0, 1)."""
    from moepipe.placement.forecast import as_forecast

    label, fn = _load("forecaster", forecaster)
    rng = np.random.default_rng(0)
    n = 0

    def call(history: np.ndarray, horizon: int, decay: float, case: str):
        given = history.copy()
        try:
            raw = fn(history, horizon, decay)
        except TypeError as err:
            _fail(label, case, f"{err}: a forecaster is called as (history [T, E], horizon, decay)")
        try:
            out = as_forecast(raw, history.shape[1])
        except ValueError as err:
            _fail(label, case, f"{err}: return a Forecast(mean, scenarios, weights) or an array of {history.shape[1]} loads")
        if not np.array_equal(history, given):
            _fail(label, case, "wrote to its history: a forecaster must be pure")
        if out.scenarios is not None and not np.allclose(out.weights @ out.scenarios, out.mean, rtol=1e-6, atol=1e-9 * max(out.mean.sum(), 1.0)):
            _fail(label, case, "the mean is not the weighted mean of the scenarios")
        return out

    for E in (1, 8):
        obs = rng.uniform(0, 100, (12, E))
        for decay in (0.0, 0.5, 0.8):
            for horizon in (1, 5):
                for T in (1, 2, 4, len(obs)):
                    case = f"E={E} T={T} horizon={horizon} decay={decay}"
                    out, again = call(obs[:T], horizon, decay, case), call(obs[:T], horizon, decay, case)
                    if not (np.array_equal(out.mean, again.mean) and (out.scenarios is None) == (again.scenarios is None)
                            and (out.scenarios is None or np.array_equal(out.scenarios, again.scenarios))):
                        _fail(label, case, "two calls with the same history differ: a forecaster must be deterministic")
                    n += 1
                steady = call(np.repeat(obs[:1], 6, axis=0), horizon, decay, f"E={E} horizon={horizon} decay={decay} steady")
                if not np.allclose(steady.mean, obs[0]) or (steady.scenarios is not None and not np.allclose(steady.scenarios, obs[0])):
                    _fail(label, f"E={E} horizon={horizon} decay={decay} steady", "a load that never changes must forecast itself")
    return n


# ------------------------------------------------------------------ schedules


def check_schedule(schedule: Any) -> int:
    """A ScheduleSpec: style "loop" | "v"; a torch.distributed.pipelining class (single-stage for
    multi_stage=False, multi-stage otherwise) or, for a schedule only moepipe's executor runs,
    none and an `order` function; V style runs 2 stages per rank; and the program it gives at a
    few shapes passes the executor's validation (every microbatch's forward and backward on every
    stage, sends matched to receives, no deadlock when simulated). Returns the shapes checked."""
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

    from moepipe.config import ConfigError
    from moepipe.plugins.registry import register, unregister
    from moepipe.sim.schedules import schedule_program

    label, spec = _load("schedule", schedule)
    if not all(hasattr(spec, a) for a in ("torch_class", "style", "multi_stage", "order")):
        _fail(label, "spec", "is not a ScheduleSpec(torch_class, style, multi_stage, order)")
    if spec.style not in ("loop", "v"):
        _fail(label, "spec", f"style={spec.style!r}: use 'loop' or 'v'")
    if spec.torch_class is None and spec.order is None:
        _fail(label, "spec", "has neither a torch_class nor an order function: give one")
    if spec.torch_class is not None:
        cls = import_path(spec.torch_class) if isinstance(spec.torch_class, str) else spec.torch_class
        base = PipelineScheduleMulti if spec.multi_stage else PipelineScheduleSingle
        if not (isinstance(cls, type) and issubclass(cls, base)):
            _fail(label, "spec", f"torch_class {cls!r} is not a {base.__name__} (multi_stage={spec.multi_stage})")
    if spec.style == "v" and not spec.multi_stage:
        _fail(label, "spec", "a V-style schedule places two stages per rank: set multi_stage=True")
    v = 2 if spec.multi_stage else 1
    name = "_conformance_schedule"  # checked under a private name: the spec need not be registered
    register("schedule", name)(spec)
    shapes = [(2, 4), (4, 8), (4, 12)]
    try:
        for pp, m in shapes:
            try:
                schedule_program(name, pp, v, m)
            except ConfigError as err:
                _fail(label, "program", f"at pp={pp}, virtual_stages={v}, microbatches={m}: {err}")
    finally:
        unregister("schedule", name)
    return len(shapes)


# ------------------------------------------------------------------ MoE backends

LAYER_INTERFACE = ("stats", "record_stats", "aux_loss_scale", "update_expert_bias", "set_routing_skew", "attach_expert_group")


def check_moe_backend(backend: Any) -> int:
    """`build(d_model, MoEConfig)` gives a module with the MoE layer interface
    (moepipe.model.backends) whose forward keeps the activation's shape and counts every token's
    top_k choices in `stats`; `check_config` is callable."""
    import torch

    from moepipe.config import MoEConfig

    label, be = _load("moe_backend", backend)
    if not (callable(getattr(be, "build", None)) and callable(getattr(be, "check_config", None))):
        _fail(label, "interface", "needs callables build(d_model, cfg) and check_config(cfg)")
    d, E, k = 16, 4, 2
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=16, backend=label)
    torch.manual_seed(0)
    layer = be.build(d, cfg)
    missing = [a for a in LAYER_INTERFACE if not hasattr(layer, a)]
    if missing:
        _fail(label, "layer", f"the layer lacks {', '.join(missing)} (the MoE layer interface in moepipe.model.backends)")
    x = torch.randn(2, 8, d)
    y = layer(x)
    if tuple(y.shape) != tuple(x.shape) or not torch.isfinite(y).all():
        _fail(label, "forward", f"returned shape {tuple(y.shape)} for input {tuple(x.shape)} or a non-finite value")
    demand = layer.stats.host().demand if hasattr(layer.stats, "host") else None
    if demand is not None and float(np.asarray(demand).sum()) != 2 * 8 * k:
        _fail(label, "stats", f"counted {float(np.asarray(demand).sum())} assignments for {2 * 8} tokens x top_k={k}")
    return 1


CHECKS = {"placer": check_placer, "workload": check_workload, "forecaster": check_forecaster,
          "schedule": check_schedule, "moe_backend": check_moe_backend}


def check(kind: str, plugin: Any) -> int:
    """The conformance check of `kind` on `plugin` (a name or the object)."""
    return CHECKS[kind](plugin)


__all__ = ["CHECKS", "ConformanceError", "check", "check_forecaster", "check_moe_backend", "check_placer",
           "check_schedule", "check_workload", "placer_inputs"]
