"""Figure 7: dynamic placement under skew and layer rebalancing across stages (in the spirit of
FlexMoE and DynMo): static vs eplb vs topo, measured on CPU and simulated at 8 to 1,024 GPUs,
homogeneous and heterogeneous.

Measured (real runtime, CPU workers on gloo, through moepipe's launcher; injected, labelled
conditions):
  skew   pp=1 x ep=2, a rotating hot expert (workload.kind=rotating, moves every 20 steps):
         eplb and topo re-plan every 10 steps from the EMA of routed tokens;
  slow   pp=2 x ep=1, worker 0 emulated at half speed (topology=local_cpu_slow,
         workload.emulate_speed=true): topo moves blocks to the fast worker (layer
         rebalancing); eplb only moves experts, so it equals static here.
  Per run: wall time, step time over the run (metrics.jsonl), re-plan events (step, migrated,
  bytes, seconds, stage split).
Simulated (moepipe.sim via the placers' own evaluation): deepseek_v2_lite-shaped model on
8, 32, 128 and 1,024 GPUs (8 per node, NVLink in a node, InfiniBand across), all H100 or
half A100 / half H100, per-layer log-normal expert skew; predicted iteration time of each
placer relative to static.

    .venv/bin/python experiments/fig_placement.py            # ~6 min on 2 cores
    .venv/bin/python experiments/fig_placement.py --sim-only
    .venv/bin/python experiments/fig_placement.py --quick --out /tmp/x/fig_placement.json   # 4 steps, a tiny model, 8 GPUs simulated
Full variant: the measured part on GPUs is the same runs with train.device=cuda and a
larger model (e.g. --extra model=small train.batch_size=64); the simulated part already
runs at full scale.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fig_common as fc  # noqa: E402

from moepipe.config import DeviceGroupConfig, TopologyConfig, compose_config  # noqa: E402

PLACERS = ("static", "eplb", "topo")
MODEL = [
    "model=tiny", "model.n_layers=8", "model.d_model=128", "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=512",
    "moe.capacity_factor=0", "moe.aux_loss_coef=0", "train.seq_len=64", "train.batch_size=16", "train.dtype=fp32",
    "train.device=cpu", "train.num_threads=1", "train.eval_every=0", "train.eval_batches=1", "train.log_every=2",
    "logger.progress=none", "logger=none",
]
MEASURED = {
    "skew": ["parallel.pp=1", "parallel.ep=2", "parallel.dp=1", "schedule=1f1b", "schedule.microbatches=1",
             "workload.kind=rotating", "workload.strength=8.0", "workload.period=20"],
    "slow": ["parallel.pp=2", "parallel.ep=1", "parallel.dp=1", "schedule=1f1b", "schedule.microbatches=4",
             "topology=local_cpu_slow", "workload.emulate_speed=true"],
}
SIM_SIZES = {8: (2, 4, 1), 32: (4, 8, 1), 128: (4, 16, 2), 1024: (8, 64, 2)}  # devices -> (pp, ep, dp)


def measured(steps: int, interval: int, out_root: str, extra_model: list[str] = ()) -> list[dict]:
    from moepipe.train.launch import launch

    rows = []
    for scen, extra in MEASURED.items():
        for placer in PLACERS:
            over = MODEL + list(extra_model) + extra + [f"train.steps={steps}", f"placer={placer}", f"placer.interval={interval if placer != 'static' else 0}",
                                    "placer.replica_slots=1"]
            run_dir = os.path.join(out_root, f"{scen}_{placer}")
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: never resume an older one's checkpoint
            summary = launch(compose_config(over), run_dir)
            steps_rows, events = [], []
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                for line in f:
                    r = json.loads(line)
                    if r.get("event") == "replan":
                        plan = json.loads(r["plan"]) if r.get("migrate") else None
                        events.append({k: r.get(k) for k in ("step", "migrate", "bytes_moved", "migration_s", "reason", "predicted_old_s",
                                                              "predicted_new_s", "expected_gain_s")}
                                      | {"stage_layers": plan["stage_layers"] if plan else None})
                    elif "loss" in r:
                        steps_rows.append({"step": r["step"], "tokens_per_s": r["tokens_per_s"], "loss": r["loss"],
                                           "load_balance_max": r.get("load_balance_max")})
            rows.append({"scenario": scen, "placer": placer, "wall_s": summary["wall_time_s"], "tokens_per_s": summary["tokens_per_s"],
                         "final_train_loss": summary["final_train_loss"], "migrations": sum(bool(e["migrate"]) for e in events),
                         "events": events, "curve": steps_rows, "overrides": over})
            print(f"{scen:5s} {placer:6s} wall {summary['wall_time_s']:.1f} s, {rows[-1]['migrations']} migrations", flush=True)
    for r in rows:
        base = next(x for x in rows if x["scenario"] == r["scenario"] and x["placer"] == "static")
        r["speedup_vs_static"] = base["wall_s"] / r["wall_s"]
    return rows


def topology(n: int, hetero: bool) -> TopologyConfig:
    if hetero:
        groups = [DeviceGroupConfig(count=n // 2, name="A100", tflops=220.0, memory_gb=80.0, intra_node_bw_gbps=300.0, inter_node_bw_gbps=25.0),
                  DeviceGroupConfig(count=n // 2, name="H100", tflops=690.0, memory_gb=80.0)]
    else:
        groups = [DeviceGroupConfig(count=n, name="H100", tflops=690.0, memory_gb=80.0)]
    return TopologyConfig(name=f"{'hetero' if hetero else 'h100'}_{n}", nodes=max(1, n // 8), devices_per_node=min(8, n), device_groups=groups,
                          intra_node_bw_gbps=450.0, intra_node_latency_us=5.0, inter_node_bw_gbps=50.0, inter_node_latency_us=12.0)


def simulated(seed: int, sizes: dict = SIM_SIZES) -> list[dict]:
    from moepipe.placement.placers import Evaluator, inputs_from_config, make_placement
    from moepipe.placement.topology import from_config
    from moepipe.placement.workloads import expert_distribution

    rows = []
    for n, (pp, ep, dp) in sizes.items():
        for hetero in (False, True):
            cfg = compose_config(["model=deepseek_v2_lite", f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.dp={dp}",
                                  "schedule=1f1b", "schedule.microbatches=16", "placer.interval=0", f"train.batch_size={16 * dp * ep}", "train.seq_len=4096",
                                  "train.activation_checkpointing=true", "placer.replica_slots=1"])
            from moepipe.config import moe_layer_ids

            E = cfg.moe.num_experts
            load = {l: expert_distribution("lognormal", 0, l, E, ep=ep, strength=1.0, seed=seed) for l in moe_layer_ids(cfg.model, cfg.moe)}
            inputs = inputs_from_config(cfg, from_config(topology(n, hetero), n), expert_load=load)
            ev = Evaluator(inputs)
            times = {}
            for placer in PLACERS:
                t0 = time.perf_counter()
                plan = make_placement(placer, inputs, cfg.placer.replica_slots, evaluator=ev)
                solve = time.perf_counter() - t0
                res = ev.evaluate(plan)
                times[placer] = res.iteration_time_s
                rows.append({"devices": n, "hetero": hetero, "pp": pp, "ep": ep, "dp": dp, "placer": placer,
                             "iteration_time_s": res.iteration_time_s, "solve_time_s": solve})
            for r in rows[-len(PLACERS):]:
                r["speedup_vs_static"] = times["static"] / r["iteration_time_s"]
            print(f"sim {n:5d} {'hetero' if hetero else 'homog '}: " + ", ".join(f"{p} {times['static'] / times[p]:.2f}x" for p in PLACERS), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sim-only", action="store_true")
    ap.add_argument("--out-runs", default=os.path.join(fc.ROOT, "runs", "fig_placement"))
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_placement.json"))
    args = ap.parse_args()
    quick_model = []
    sizes = SIM_SIZES
    if args.quick:
        args.steps, args.interval = 4, 1
        quick_model = [o for o in fc.QUICK_MODEL if not o.startswith("train.log_every")] + ["train.batch_size=4", "train.seq_len=16"]
        sizes = {8: SIM_SIZES[8]}
        args.out_runs = os.path.join(fc.out_dir_of(args), "runs_fig_placement")
    args.out = fc.check_output(args)
    t0 = time.perf_counter()
    meas = [] if args.sim_only else measured(args.steps, args.interval, args.out_runs, quick_model)
    sim = simulated(args.seed, sizes)
    payload = {"measured": meas, "simulated": sim, "wall_s": time.perf_counter() - t0,
               "provenance": fc.provenance(args, {"model": MODEL + quick_model, "scenarios": MEASURED}, args.seed)}
    path, figs = fc.save_and_draw("fig_placement", payload, [{k: v for k, v in r.items() if k not in ("events", "curve", "overrides")} for r in meas] + sim, args)
    print("wrote", path)
    print("figures:", ", ".join(figs))
    n_max = max(r["devices"] for r in sim)
    fc.headline(f"topo_speedup_vs_static_sim_{n_max}",
                ",".join(f"{'hetero' if r['hetero'] else 'h100'}:{r['speedup_vs_static']:.2f}" for r in sim if r["devices"] == n_max and r["placer"] == "topo"))


if __name__ == "__main__":
    main()
