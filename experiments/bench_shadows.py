"""The fast path of two-speed placement in simulation (issue 15, item 3): per-step shadows of hot
experts (moepipe/placement/shadows.py) against the plan's own replicas, at equal slots.

Protocol per (topology, workload), plan-on-past / run-on-future: the placer (eplb by default)
plans from the mean load of the `interval` steps before s0; then every step t of the next
`interval` runs on its own load, and we compare per step
  plan        the plan with `slots` replica slots per EP rank per MoE layer (its replicas carry
              full training state: parameters, gradient and AdamW moments)
  plan0       the same placer with no replica slots (reference)
  shadow      plan0 + shadows chosen from the forecast (the previous step's load), at most
              `slots` per EP rank per MoE layer (weights + gradient buffers only)
  shadow_now  plan0 + shadows chosen from step t's own counts (the runtime can: after the router,
              before dispatch)
Shadow variants pay their transfers every step: weights home -> shadows and gradients back, on
the EP group's links (intra- vs inter-node), not overlapped with compute. Scores:
  MoE time    sum over MoE layers of the layer's step time on its pipeline rank (m microbatches
              x (slowest member's compute + all-to-all) per phase, + shadow transfers):
              shadows.layer_step_time, the cost model's own rule
  iteration   the simulator's iteration time (placers.Evaluator, = moepipe.sim.simulate) of the
              plan whose expert map lists the shadows as copies, with the plan's own gradient
              all-reduce, plus the shadows' transfers per pipeline rank (all its layers' bytes in
              one broadcast and one return; pipeline ranks in parallel)
Speedups are mean time over the future window, plan / shadow, geometric means over topologies x
workloads per family (moving: rotating and hot blocks moving by fractions of a block with periods
5-80; burst; stationary: lognormal, zipf). Also the decision time of choose_shadows per MoE layer at
256 experts x EP64 (1,024-device job of bench_placer.scale_inputs, 8 nodes per EP group, static
holders), CPU time (the machine is shared), median over layers x loads.

    PYTHONPATH=. .venv/bin/python experiments/bench_shadows.py                 # writes results/bench_shadows.json
    PYTHONPATH=. .venv/bin/python experiments/bench_shadows.py --quick --out /tmp/s.json

The last line printed is `speedup_shadow_vs_plan_moving=<x>`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import fig_common as fc  # noqa: E402
from bench_placer import CASES as PLACER_CASES, COMMON, scale_inputs  # noqa: E402

from moepipe.config import compose_config  # noqa: E402
from moepipe.placement.placers import Evaluator, inputs_from_config, make_placement  # noqa: E402
from moepipe.placement.placers.inputs import BYTES_PER_PARAM_TRAIN, PlacementInputs  # noqa: E402
from moepipe.placement.plan import Plan, rank_grid  # noqa: E402
from moepipe.placement.shadows import choose_shadows, layer_setup, layer_step_time, shadowed_expert_map, transfer_matrix  # noqa: E402
from moepipe.placement.workloads import expert_distribution  # noqa: E402
from moepipe.train.metrics import write_json  # noqa: E402

TOPOLOGIES = ("nvlink_8gpu", "ib_4x8", "ib_16x8")
HOT = 4.0  # a moving block's experts each get HOT times another expert's share (as eval_forecast)
# name -> (family, spec): workloads.py kinds (kind, strength, period) or a moving block (fraction of its width, period)
WORKLOADS = {
    "rotating_p10": ("moving", ("rotating", 8.0, 10)),
    "moving_f0.25_p5": ("moving", ("block", 0.25, 5)),
    "moving_f0.5_p5": ("moving", ("block", 0.5, 5)),
    "moving_f0.5_p20": ("moving", ("block", 0.5, 20)),
    "moving_f1_p80": ("moving", ("block", 1.0, 80)),
    "burst": ("burst", ("burst", 8.0, 50)),
    "lognormal": ("stationary", ("lognormal", 1.0, 50)),
    "zipf": ("stationary", ("zipf", 1.2, 50)),
}
QUICK_WORKLOADS = ("rotating_p10", "moving_f0.5_p5", "burst")
VARIANTS = ("plan", "plan0", "shadow", "shadow_now")


def distribution(spec, step: int, layer: int, E: int, ep: int) -> np.ndarray:
    """[E] routing probabilities of one MoE layer at `step`."""
    kind, a, period = spec
    if kind != "block":
        return expert_distribution(kind, step, layer, E, ep=ep, strength=a, period=period, burst_every=10)
    width = -(-E // ep)  # one EP rank's share of the experts under static blocks
    shift = max(1, round(a * width))
    w = np.ones(E)
    w[:width] = HOT
    return np.roll(w, (3 * width * layer + shift * (step // period)) % E) / w.sum()  # layers' blocks start apart


def loads(spec, steps, moe, E: int, ep: int) -> np.ndarray:
    """[len(steps), n_moe, E]."""
    return np.array([[distribution(spec, s, l, E, ep) for l in moe] for s in steps])


def as_load(x: np.ndarray, moe) -> dict:
    return {l: x[i] for i, l in enumerate(moe)}


class Job:
    """One case: inputs, the layer setups of every MoE layer's EP group (dp replica 0: the
    replicas of these presets have identical links) and the per-pipeline-rank layers."""

    def __init__(self, overrides: list):
        self.base = inputs_from_config(compose_config(overrides + COMMON))
        b = self.base
        self.moe, self.E = list(b.spec.moe_layers), b.spec.num_experts
        self.grid = rank_grid(b.pp, b.ep, b.dp)
        self.setups, self.pp_of = {}, {}

    def setup_for(self, plan: Plan):
        for l in self.moe:
            p = plan.stage_to_pp_rank[plan.stage_of_layer(l)]
            if (l, p) not in self.setups:
                self.setups[l, p] = layer_setup(self.base.cost_model, self.base.topology, self.grid[p, 0], l, self.base.microbatches)
            self.pp_of[l] = p
        return {l: self.setups[l, self.pp_of[l]] for l in self.moe}

    def inputs(self, load: np.ndarray) -> PlacementInputs:
        return PlacementInputs(**{**self.base.__dict__, "expert_load": as_load(load, self.moe)})


def transfers_s(job: Job, plan: Plan, shadows: dict, setups: dict) -> float:
    """Per-step shadow transfers of the whole plan: per pipeline rank one broadcast of all its
    layers' shadow weights and one gradient return (same links); pipeline ranks in parallel."""
    topo, worst = job.base.topology, 0.0
    for p in range(plan.pp):
        w = g = 0.0
        for l in job.moe:
            if job.pp_of[l] == p and shadows.get(l):
                m = transfer_matrix(plan.expert_map[l], shadows[l], plan.ep)
                w = w + m * setups[l].weight_bytes
                g = g + m.T * setups[l].grad_bytes
        if not isinstance(w, float):
            worst = max(worst, topo.all_to_all_time(w, job.grid[p, 0]) + topo.all_to_all_time(g, job.grid[p, 0]))
    return float(worst)


def iteration_s(job: Job, ev: Evaluator, plan: Plan, shadows: dict, setups: dict) -> float:
    if not any(shadows.values()):
        return ev.evaluate(plan).iteration_time_s
    aug = Plan(plan.stage_layers, plan.stage_to_pp_rank, shadowed_expert_map(plan.expert_map, shadows), plan.pp, plan.ep, plan.dp)
    pipeline = ev.evaluate(aug).iteration_time_s - ev.grad_sync(aug)  # shadows join no DP all-reduce: the homes' gradients do
    return pipeline + ev.grad_sync(plan) + transfers_s(job, plan, shadows, setups)


def moe_s(job: Job, plan: Plan, load: np.ndarray, shadows: dict, setups: dict) -> tuple[float, float]:
    """(sum over MoE layers of the layer's step time, of which shadow transfers)."""
    tot = xfer = 0.0
    for i, l in enumerate(job.moe):
        t = layer_step_time(setups[l], plan.expert_map[l], load[i], shadows.get(l))
        tot += t.step_s
        xfer += t.transfer_s
    return tot, xfer


def run_case(name: str, args, workloads) -> dict:
    job = Job(PLACER_CASES[name])
    b = job.base
    s0, n, R = args.s0, args.interval, args.slots
    out = {"overrides": PLACER_CASES[name] + COMMON, "pp": b.pp, "ep": b.ep, "dp": b.dp, "experts": job.E, "moe_layers": len(job.moe),
           "microbatches": b.microbatches, "workloads": {}}
    for wname in workloads:
        family, spec = WORKLOADS[wname]
        past = loads(spec, range(s0 - n, s0), job.moe, job.E, b.ep)
        future = loads(spec, range(s0 - 1, s0 + n), job.moe, job.E, b.ep)  # one step before: the first forecast
        inp = job.inputs(past.mean(0))
        plans = {"plan": make_placement(args.placer, inp, replica_slots=R), "plan0": make_placement(args.placer, inp, replica_slots=0)}
        setups = job.setup_for(plans["plan0"])
        assert job.setup_for(plans["plan"]) == setups  # same stage layout: the placer's layers do not depend on replicas here
        acc = {v: {"moe_s": [], "iteration_s": [], "transfer_s": [], "shadows": [], "decision_cpu_s": []} for v in VARIANTS}
        for t in range(1, n + 1):
            now, prev = future[t], future[t - 1]
            ev = Evaluator(job.inputs(now))
            for v in VARIANTS:
                plan = plans["plan" if v == "plan" else "plan0"]
                shadows, cpu = {}, 0.0
                if v.startswith("shadow"):
                    src = prev if v == "shadow" else now
                    c0 = time.process_time()
                    shadows = {l: choose_shadows(src[i], plan.expert_map[l], setups[l], R).shadows for i, l in enumerate(job.moe)}
                    cpu = (time.process_time() - c0) / len(job.moe)
                m, x = moe_s(job, plan, now, shadows, setups)
                a = acc[v]
                a["moe_s"].append(m)
                a["transfer_s"].append(x)
                a["iteration_s"].append(iteration_s(job, ev, plan, shadows, setups))
                a["shadows"].append(sum(len(r) for s in shadows.values() for r in s.values()) / len(job.moe))
                a["decision_cpu_s"].append(cpu)
        rows = {v: {k: float(np.mean(x)) for k, x in acc[v].items()} for v in VARIANTS}
        for v in VARIANTS:
            rows[v]["replicas_per_layer"] = int(sum(len(r) - 1 for r in plans["plan" if v == "plan" else "plan0"].expert_map[job.moe[0]]))
        rows["family"] = family
        for v in ("shadow", "shadow_now", "plan0"):
            rows[f"speedup_{v}_vs_plan"] = rows["plan"]["moe_s"] / rows[v]["moe_s"]
            rows[f"iteration_speedup_{v}_vs_plan"] = rows["plan"]["iteration_s"] / rows[v]["iteration_s"]
        out["workloads"][wname] = rows
        print(f"{name:<12} {wname:<16} {family:<10} " + " ".join(f"{v}={rows[v]['moe_s']:.4f}" for v in VARIANTS)
              + f"  moe x{rows['speedup_shadow_vs_plan']:.3f} (now x{rows['speedup_shadow_now_vs_plan']:.3f})"
              f"  iter x{rows['iteration_speedup_shadow_vs_plan']:.3f} (now x{rows['iteration_speedup_shadow_now_vs_plan']:.3f})"
              f"  shadows/layer {rows['shadow']['shadows']:.1f} xfer {rows['shadow']['transfer_s'] / rows['shadow']['moe_s']:.1%}", flush=True)
    # memory per slot: a replica holds parameters, gradient and two AdamW moments; a shadow weights + a gradient buffer
    st = next(iter(job.setups.values()))
    params = b.spec.layers[job.moe[0]].expert_params
    out["bytes_per_replica_slot"] = float(params * BYTES_PER_PARAM_TRAIN)
    out["bytes_per_shadow_slot"] = float(st.weight_bytes + st.grad_bytes)
    return out


def decision_time(args) -> dict:
    """choose_shadows per MoE layer at 256 experts x EP64 (the 1,024-device job, EP group 0 = 8 nodes)."""
    inp = scale_inputs()
    E, ep = inp.spec.num_experts, inp.ep
    layers = inp.spec.moe_layers[: args.decision_layers]
    holders = [[e * ep // E] for e in range(E)]
    names = QUICK_WORKLOADS if args.quick else tuple(WORKLOADS)
    cpu, wall, exact_cpu, per = [], [], [], {}
    for l in layers:
        st = layer_setup(inp.cost_model, inp.topology, range(ep), l, inp.microbatches)
        st.greedy_terms()  # once per layer and EP group, reused every step
        for w in names:
            load = distribution(WORKLOADS[w][1], args.s0, l, E, ep)
            c, wt = [], []
            for _ in range(args.decision_repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                ch = choose_shadows(load, holders, st, args.slots, exact=False)
                wt.append(time.perf_counter() - t0)
                c.append(time.process_time() - c0)
            c0 = time.process_time()
            chx = choose_shadows(load, holders, st, args.slots, exact=True)
            exact_cpu.append(time.process_time() - c0 - min(c))
            cpu.append(min(c))  # min over repeats: the machine's other load only adds
            wall.append(statistics.median(wt))
            per.setdefault(w, []).append({"cpu_s": min(c), "shadows": sum(map(len, ch.shadows.values())), "candidates": ch.candidates,
                                          "net_s_loop": ch.net_s, "net_s_exact": chx.net_s})
    return {"experts": E, "ep": ep, "ep_group_nodes": int(len(np.unique(inp.topology.node_of[:ep]))), "layers": len(layers),
            "workloads": list(names), "slots": args.slots, "decision_ms_per_layer": float(np.median(cpu) * 1e3),
            "decision_ms_per_layer_p90": float(np.percentile(cpu, 90) * 1e3), "decision_ms_per_layer_max": float(np.max(cpu) * 1e3),
            "decision_wall_ms_per_layer": float(np.median(wall) * 1e3), "exact_check_ms_per_layer": float(np.median(exact_cpu) * 1e3),
            "per_workload_ms": {w: float(np.median([x["cpu_s"] for x in v]) * 1e3) for w, v in per.items()},
            "per_workload": per, "loadavg": list(os.getloadavg())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--placer", default="eplb", help="the slow path's placer (eplb, topo, ...)")
    ap.add_argument("--slots", type=int, default=1, help="replica slots of `plan` = shadow slots of the shadow variants, per EP rank per MoE layer")
    ap.add_argument("--interval", type=int, default=20, help="steps in the observed window and in the future window")
    ap.add_argument("--s0", type=int, default=100, help="the step the placer plans at")
    ap.add_argument("--decision-layers", type=int, default=8)
    ap.add_argument("--decision-repeats", type=int, default=5)
    fc.add_output_args(ap, os.path.join(ROOT, "results", "bench_shadows.json"))
    args = ap.parse_args()
    if args.quick:
        args.topologies, args.workloads, args.interval, args.s0 = ["nvlink_8gpu", "ib_4x8"], list(QUICK_WORKLOADS), 2, 10
        args.decision_layers, args.decision_repeats = 2, 2
    args.out = fc.check_output(args)
    info = fc.provenance(args, {t: PLACER_CASES[t] + COMMON for t in args.topologies}, seed=0)
    t_start = time.perf_counter()
    cases = {t: run_case(t, args, args.workloads) for t in args.topologies}
    dec = decision_time(args)

    gm = lambda x: float(np.exp(np.mean(np.log(x)))) if len(x) else None  # noqa: E731
    summary = {}
    for fam in ("moving", "burst", "stationary"):
        rows = [r for c in cases.values() for r in c["workloads"].values() if r["family"] == fam]
        for v, tag in (("shadow", "shadow"), ("shadow_now", "shadow_now"), ("plan0", "plan0")):
            summary[f"speedup_{tag}_vs_plan_{fam}"] = gm([r[f"speedup_{v}_vs_plan"] for r in rows])
            summary[f"iteration_speedup_{tag}_vs_plan_{fam}"] = gm([r[f"iteration_speedup_{v}_vs_plan"] for r in rows])
    summary["decision_ms_per_layer_256x64"] = dec["decision_ms_per_layer"]
    summary["decision_wall_ms_per_layer_256x64"] = dec["decision_wall_ms_per_layer"]
    summary["exact_check_ms_per_layer_256x64"] = dec["exact_check_ms_per_layer"]
    result = summary | {
        "cases": cases, "decision_256x64": dec,
        "config": {"args": vars(args), "workloads": {k: [v[0], list(v[1])] for k, v in WORKLOADS.items()}, "hot": HOT, "common_overrides": COMMON},
        "method": {"observed": "mean routing distribution over steps [s0-interval, s0)", "future": "steps [s0, s0+interval), each on its own load",
                   "speedup": "mean plan time / mean variant time over the future window, geometric mean over topologies x workloads of a family",
                   "shadow": "shadows from the previous step's load (forecast = last value)", "shadow_now": "shadows from the step's own load",
                   "transfers": "weights home->shadows + gradients back, per step, not overlapped", "equal_memory": "slots: replica slots of plan = shadow slots"},
        "loadavg_end": list(os.getloadavg()), "wall_s": time.perf_counter() - t_start, "provenance": info,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, result)
    for k, v in summary.items():
        if k != "speedup_shadow_vs_plan_moving":
            print(f"{k}={v:.4g}" if v is not None else f"{k}=None")
    print(f"decision per layer at 256x64: median {dec['decision_ms_per_layer']:.3f} ms CPU (p90 {dec['decision_ms_per_layer_p90']:.3f}, "
          f"max {dec['decision_ms_per_layer_max']:.3f}; wall {dec['decision_wall_ms_per_layer']:.3f}) per workload "
          + " ".join(f"{w}={x:.3f}" for w, x in dec["per_workload_ms"].items()) + f"; exact re-check {dec['exact_check_ms_per_layer']:.3f} ms; loadavg {dec['loadavg'][0]:.1f}")
    print(f"speedup_shadow_vs_plan_moving={summary['speedup_shadow_vs_plan_moving']:.4f}")


if __name__ == "__main__":
    main()
