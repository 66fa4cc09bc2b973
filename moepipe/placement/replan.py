"""The re-plan loop as one component: statistics -> forecast -> decide -> re-check in measured
units -> (the trainer migrates) -> event.

No process group here: a trainer feeds `observe` after every step with statistics that are
already whole-job (reduced across ranks), asks `due(done)`, gets a decision from `propose`,
moves the state itself and reports the move with `record_migration`. The distributed trainer
runs `propose` on rank 0 and broadcasts it; the single-process trainer runs it in advisory mode
(the decision is logged, nothing moves). Tests drive it with fake statistics.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional, Union

import numpy as np

from moepipe.config import ConfigError, MoepipeConfig, moe_layer_ids
from moepipe.placement.forecast import Forecast, as_forecast, ema, ema_update
from moepipe.placement.plan import Plan, static_plan, to_json
from moepipe.placement.topology import Topology

# Moving-average weights (old, new), written out rather than as 1 - x: 1 - 0.8 is not 0.2 in
# floating point, and the arithmetic must stay bit-identical to earlier runs and checkpoints.
STEP_TIME_MIX = (0.8, 0.2)  # measured step seconds (steps after the first)
EFFICIENCY_MIX = (0.5, 0.5)  # gain_efficiency and the newest realised efficiency

Forecaster = Callable[[np.ndarray, int, float], Union[Forecast, np.ndarray]]  # moepipe.plugins.interfaces: forecaster


def default_plan(cfg: MoepipeConfig) -> Plan:
    """The job's starting plan: even layer split, contiguous expert blocks, the schedule's stage placement."""
    from moepipe.sim.schedules import plan_style

    return static_plan(
        cfg.model.n_layers, moe_layer_ids(cfg.model, cfg.moe), cfg.moe.num_experts, cfg.parallel.pp, cfg.parallel.ep,
        cfg.schedule.virtual_stages, plan_style(cfg.schedule.name), cfg.parallel.dp,
    )


class ReplanLoop:
    """The placer's statistics and decisions for one run (identical on every rank that feeds it
    the same reduced statistics). Checkpoint keys: `state_dict()`."""

    def __init__(self, cfg: MoepipeConfig, topology: Union[Topology, Callable[[], Topology]], forecast: Optional[Forecaster] = None):
        from moepipe.plugins.registry import resolve

        self.cfg = cfg
        self._topology = topology  # a Topology, or a callable building it when first needed
        # expert-load forecast: placer.forecast (built-in ema by default, or a plug-in) unless given
        self.forecast: Forecaster = forecast or resolve("forecaster", cfg.placer.forecast)
        # per MoE layer: EMA of tokens per expert per step over every step (ema's O(1) running
        # form, checkpointed), and the newest placer.forecast_window steps for other forecasters
        self.load_ema: dict[int, np.ndarray] = {}
        self.load_history: dict[int, deque] = {}
        self.last_forecast: dict[int, Forecast] = {}  # what the latest propose planned for, per MoE layer
        self.time_ema: Optional[np.ndarray] = None  # measured seconds per block per step (nominal device)
        self.origin_ema: dict[int, np.ndarray] = {}  # per MoE layer: tokens per (source EP rank, expert) per step (EMA)
        self.step_time_ema: Optional[float] = None  # measured seconds per training step
        self.rebuild_s = 0.0  # measured migration time beyond the placer's transfer estimate
        self.gain_efficiency = 1.0  # share of predicted savings past migrations showed (EMA)
        self._last_move: Optional[tuple] = None  # (predicted old, new, measured step time) of the last migration
        # shadow back-off (placer.shadow_backoff): the gap to the next re-plan and its step; None:
        # every placer.interval steps
        self.replan_gap: Optional[int] = None
        self.next_replan: Optional[int] = None

    @property
    def topology(self) -> Topology:
        if callable(self._topology):
            self._topology = self._topology()
        return self._topology

    # ------------------------------------------------------------------ statistics

    def observe(self, step: int, expert_demand: dict[int, np.ndarray], block_seconds: Optional[np.ndarray], step_seconds: float,
                origins: Optional[dict[int, np.ndarray]] = None) -> None:
        """After step index `step`: whole-job tokens per expert per MoE layer, measured seconds per
        block on a nominal device (None when not measured), and the step's wall seconds. The
        first step's time is not counted: it pays one-off allocations. `origins`: per MoE layer,
        tokens per (source EP rank, expert) [ep, E], kept as an EMA for the placer."""
        decay = self.cfg.placer.ema_decay
        for layer_id, demand in expert_demand.items():
            self._observe_load(layer_id, np.array(demand, dtype=np.float64), decay)
        for layer_id, o in (origins or {}).items():
            o, prev = np.array(o, dtype=np.float64), self.origin_ema.get(layer_id)
            # another EP size (a resharded resume) starts the average afresh
            self.origin_ema[layer_id] = o if prev is None or prev.shape != o.shape else ema_update(prev, o, decay)
        if block_seconds is not None:
            now = np.asarray(block_seconds, dtype=np.float64)
            self.time_ema = now if self.time_ema is None else ema_update(self.time_ema, now, decay)  # block times: always an EMA
        if step > 0:
            prev_s = self.step_time_ema
            old, new = STEP_TIME_MIX
            self.step_time_ema = step_seconds if prev_s is None else old * prev_s + new * step_seconds

    def _observe_load(self, layer_id: int, demand: np.ndarray, decay: float) -> None:
        prev = self.load_ema.get(layer_id)
        self.load_ema[layer_id] = demand if prev is None else ema_update(prev, demand, decay)
        if self.forecast is not ema:  # ema reads load_ema: no window to keep
            self._window(layer_id).append(demand)

    def _window(self, layer_id: int) -> deque:
        return self.load_history.setdefault(layer_id, deque(maxlen=self.cfg.placer.forecast_window))

    def forecast_loads(self, horizon: int) -> dict[int, Forecast]:
        """Per MoE layer, the forecast of the next `horizon` steps' load: placer.forecast on the
        kept window; ema (and a layer with no window yet, e.g. resumed from an older checkpoint)
        is the running average itself, the arithmetic every earlier run planned on."""
        decay = self.cfg.placer.ema_decay
        out = {}
        for layer_id, running in self.load_ema.items():
            window = self.load_history.get(layer_id)
            if self.forecast is ema or not window:
                out[layer_id] = Forecast(running.copy())
            else:
                out[layer_id] = as_forecast(self.forecast(np.stack(window), horizon, decay), len(running))
        return out

    # ------------------------------------------------------------------ decisions

    def due(self, done: int) -> bool:
        """Re-plan after `done` steps: every placer.interval steps, never after the last one."""
        interval, total = self.cfg.placer.interval, self.cfg.train.steps
        if not interval or done >= total:
            return False
        return done % interval == 0 and (self.next_replan is None or done >= self.next_replan)

    def note_decision(self, done: int, decision: dict) -> None:
        """Every rank, after the re-plan at `done` (the broadcast decision): with per-step shadows
        on, a re-plan that kept the layout doubles the gap to the next one, up to
        placer.shadow_backoff x placer.interval: the fast path is covering the load, and every
        solve holds all ranks for about a step. A migration returns to every placer.interval steps."""
        pc = self.cfg.placer
        if pc.shadow_slots > 0 and not decision.get("migrate") and pc.shadow_backoff > 1:
            self.replan_gap = min(2 * (self.replan_gap or pc.interval), pc.shadow_backoff * pc.interval)
            self.next_replan = done + self.replan_gap
        else:
            self.replan_gap = self.next_replan = None

    def horizon(self, done: int) -> int:
        """Steps the next layout runs before the following re-plan (or the end)."""
        return min(self.cfg.placer.interval, self.cfg.train.steps - done)

    def settle(self) -> None:
        """Fold what the last migration actually saved per step into gain_efficiency. Idempotent
        until the next migration; every rank calls it so the state stays identical."""
        if self._last_move is None:
            return
        from moepipe.placement.placers import realised_efficiency

        eff = realised_efficiency(*self._last_move, self.step_time_ema)
        if eff is not None:
            old, new = EFFICIENCY_MIX
            self.gain_efficiency = old * self.gain_efficiency + new * eff
        self._last_move = None

    def propose(self, done: int, current: Plan) -> dict:
        """The decision after `done` steps: the configured placer on the forecast load and measured
        block times, re-checked in measured units. "plan" is JSON (the plan to run next), so the
        decision can be broadcast and logged. A placer's ConfigError keeps the layout."""
        from moepipe.placement.placers import decide, inputs_from_config

        self.settle()
        pc, horizon = self.cfg.placer, self.horizon(done)
        try:
            times = self.time_ema if self.time_ema is not None and (self.time_ema > 0).all() else None
            self.last_forecast = self.forecast_loads(horizon)
            load = {layer_id: f.mean for layer_id, f in self.last_forecast.items()}
            inputs = inputs_from_config(self.cfg, self.topology, expert_load=load or None, layer_times=times, origins=self.origins_for_plan(),
                                        **self.scenarios_for_plan())
            return self.judge(decide(pc.name, inputs, current, pc.replica_slots, horizon, pc.min_gain_frac, pc.shadow_slots), current, horizon)
        except ConfigError as err:  # e.g. no plan fits the declared memory: keep training as is
            return {"placer": pc.name, "migrate": False, "reason": f"placer error, layout kept: {err}", "plan": to_json(current)}

    def scenarios_for_plan(self) -> dict:
        """The latest forecast's load scenarios as the placer reads them (`scenarios`: one {moe
        layer: load} per scenario, `scenario_weights`), for placer.objective=expected|quantile;
        empty when the objective is the mean or a layer's forecast has no scenarios."""
        fc = self.last_forecast
        if self.cfg.placer.objective == "mean" or not fc or any(f.scenarios is None for f in fc.values()):
            return {}
        n = {len(f.scenarios) for f in fc.values()}
        if len(n) != 1:  # forecasters give every layer as many scenarios (one horizon); a plug-in may not
            return {}
        first = next(iter(fc.values()))
        return {"scenarios": [{l: f.scenarios[k] for l, f in fc.items()} for k in range(n.pop())], "scenario_weights": first.weights}

    def origins_for_plan(self) -> Optional[dict[int, np.ndarray]]:
        """The origin EMA when it describes the mesh being planned (its EP size and every MoE
        layer); otherwise None, i.e. tokens assumed evenly spread (e.g. placer.advise_mesh)."""
        ep, layers = self.cfg.parallel.ep, moe_layer_ids(self.cfg.model, self.cfg.moe)
        if not layers or any(l not in self.origin_ema or self.origin_ema[l].shape[0] != ep for l in layers):
            return None
        return {l: self.origin_ema[l] for l in layers}

    def judge(self, d, current: Plan, horizon: int) -> dict:
        """Re-check the placer's decision `d` in measured units. The cost model's absolute times
        can be far off on a given machine (CPU workers especially), so the predicted saving is
        rescaled by measured / predicted step time and by `gain_efficiency`, and the migration
        cost gains the rebuild time measured at the previous migration."""
        scale = self.step_time_ema / d.predicted_old_s if self.step_time_ema and d.predicted_old_s > 0 else 1.0
        gain = d.predicted_gain_s * scale * self.gain_efficiency
        cost = d.migration_cost_s + self.rebuild_s
        frac = (1 - d.predicted_new_s / d.predicted_old_s) * self.gain_efficiency if d.predicted_old_s > 0 else 0.0
        min_frac = self.cfg.placer.min_gain_frac
        migrate, reason = bool(d.migrate and d.plan != current), d.reason
        if migrate and frac <= min_frac:
            migrate, reason = False, (f"expected saving {frac:.2%} per step (x{self.gain_efficiency:.2f}, the share past migrations "
                                      f"showed) <= min_gain_frac {min_frac:.2%}")
        elif migrate and gain <= cost:
            migrate, reason = False, f"measured-scale gain {gain:.3g} s over {horizon} steps <= migration {cost:.3g} s (incl. rebuild)"
        return {
            "placer": self.cfg.placer.name,
            "migrate": migrate,
            "predicted_old_s": d.predicted_old_s,
            "predicted_new_s": d.predicted_new_s,
            "predicted_gain_s": d.predicted_gain_s,
            "time_scale": scale,
            "gain_efficiency": self.gain_efficiency,
            "expected_gain_s": gain,
            "predicted_migration_s": cost,
            "solve_s": d.solve_time_s,
            **{f"{k}_{tag}": v for tag, t in (("old", d.traffic_old), ("new", d.traffic_new)) for k, v in (t or {}).items()},  # all-to-all bytes per iteration by link class, current and proposed plan
            "reason": reason,
            "plan": to_json(d.plan if migrate else current),
        }

    # ------------------------------------------------------------------ after the trainer acted

    def record_migration(self, event: dict) -> None:
        """After the trainer migrated (`event`: the decision plus the measured `migration_s`):
        remember the predicted saving for `settle` and learn the unmodelled rebuild time."""
        self._last_move = (event["predicted_old_s"], event["predicted_new_s"], self.step_time_ema)
        self.rebuild_s = max(0.0, event["migration_s"] - (event["predicted_migration_s"] - self.rebuild_s))

    @staticmethod
    def event(done: int, decision: dict, migration: Optional[dict] = None, advisory: bool = False) -> dict:
        """The metrics.jsonl "replan" row: the decision without its plan (the plan appears only as
        the migration's own "plan"), then what the migration measured."""
        row = {"step": done, "event": "replan", **({"advisory": True} if advisory else {}),
               **{k: v for k, v in decision.items() if k != "plan"}}
        return row | (migration or {})

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, np.ndarray]:
        """Checkpoint entries (float64 arrays; the trainer stores them as tensors under placer.*)."""
        out = {f"load_ema.{lid}": v.copy() for lid, v in sorted(self.load_ema.items())}
        out |= {f"load_history.{lid}": np.stack(w) for lid, w in sorted(self.load_history.items()) if w}
        out |= {f"origin_ema.{lid}": v.copy() for lid, v in sorted(self.origin_ema.items())}
        if self.time_ema is not None:
            out["time_ema"] = self.time_ema.copy()
        if self.step_time_ema is not None:
            out["step_time_ema"] = np.float64(self.step_time_ema)
        out["rebuild_s"] = np.float64(self.rebuild_s)
        out["gain_efficiency"] = np.float64(self.gain_efficiency)
        if self.next_replan is not None:
            out["replan_gap"], out["next_replan"] = np.float64(self.replan_gap), np.float64(self.next_replan)
        return out

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict; values may be numpy arrays or tensors (anything np.asarray reads)."""
        arr = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
        self.load_ema = {int(k.split(".", 1)[1]): v.copy() for k, v in arr.items() if k.startswith("load_ema.")}
        self.load_history = {}
        self.origin_ema = {int(k.split(".", 1)[1]): v.copy() for k, v in arr.items() if k.startswith("origin_ema.") and v.ndim == 2}
        for k, v in arr.items():
            if k.startswith("load_history.") and v.ndim == 2 and self.forecast is not ema:
                self._window(int(k.split(".", 1)[1])).extend(v.copy())
        self.time_ema = arr["time_ema"].copy() if "time_ema" in arr else None
        self.step_time_ema = float(arr["step_time_ema"]) if "step_time_ema" in arr else None
        self.rebuild_s = float(arr["rebuild_s"]) if "rebuild_s" in arr else 0.0
        self.gain_efficiency = float(arr["gain_efficiency"]) if "gain_efficiency" in arr else 1.0
        backed_off = "next_replan" in arr and self.cfg.placer.shadow_slots > 0  # a resume with shadows off re-plans every interval
        self.replan_gap = int(arr["replan_gap"]) if backed_off else None
        self.next_replan = int(arr["next_replan"]) if backed_off else None
