"""Dynamic placement on the real runtime (issue 5): the same training steps with a static
layout vs the `topo` placer re-planning every N steps, on CPU workers (gloo), wall time
including the placer's solves and the migrations.

Scenarios (all labelled, injected conditions; see `workload.*` in conf):
- skew:  pp=1 x ep=2, routing skewed towards EP rank 0's experts (workload.kind=hot_rank):
         static leaves rank 0 with most expert work; topo moves experts (and replicas).
- slow:  pp=2 x ep=1, worker 0 emulated at half speed (topology=local_cpu_slow,
         workload.emulate_speed=true): static splits blocks evenly; topo shifts blocks to the
         fast worker.
- moving (issue 15): pp=1 x ep=2, one hot expert per layer (workload.kind=rotating, strength 8)
         moving to the next expert every --period steps (20); static vs topo re-planning every
         --interval steps (10) vs topo plus the fast path (placer.shadow_slots, per-step
         shadows of hot experts). `speedup_moving` = static / (topo + shadows);
         `speedup_moving_topo_without_shadows` = static / topo. Here topo plans with what the
         project recommends for moving load (MOVING_PLACER: placer.forecast=periodic,
         placer.objective=expected, which bench_placer's `moving` section scores on moving hot
         blocks): the default EMA forecast plans for the mean of a load that has already moved
         on, so each plan balances the hot spot that has just gone.
- shadow_step: pp=1 x ep=2, a fixed hot expert (hot_expert, strength 8), no re-planning: static
         with shadows off vs on, side by side (`shadow_step_ratio` = off / on wall time,
         `shadow_step_steady_ratio` on tokens/s after the first windows). On one machine the
         weight broadcast and gradient return run over loopback, so this shows the compute
         balance a shadow buys and the cost of its bookkeeping, not a network's transfer cost.
         Also one MoE layer alone (2 gloo ranks, --layer-iters rounds): the busiest rank's CPU
         seconds per step of that layer (forward + backward of every microbatch; with shadows
         also the decision, weight exchange and gradient return), off / on
         (`shadow_layer_cpu_ratio`), and the wall ratio (`shadow_layer_wall_ratio`). CPU seconds count what each rank computes, which
         is what shadows rebalance, and stay meaningful on a loaded machine.
- moving, paired (`--paired-moving`, on whenever moving runs; key moving_paired): the moving
         arms (static, static + shadows, topo, topo + shadows) and `uniform` (the same tokens with
         the routing skew off: perfectly even expert load, the ceiling no placement can beat)
         in ONE set of 2 workers, interleaved step by step, so background load on a shared
         machine falls on every arm alike; wall and busiest-rank CPU seconds per arm.
         `speedup_moving_paired` = static / (topo + shadows), `speedup_moving_ceiling` =
         static / uniform there.
Each scenario runs static and topo alternately (`--rounds` pairs, order flipped each round)
through the real launcher (moepipe.train.launch), so background load hits both alike; the
median wall time per variant counts. speedup = geomean over skew and slow of static / topo.

    .venv/bin/python experiments/bench_dynamic.py            # writes results/bench_dynamic.json (~18 min on 2 cores)
    .venv/bin/python experiments/bench_dynamic.py --steps 60 --rounds 3
    .venv/bin/python experiments/bench_dynamic.py --quick --out /tmp/x.json   # 4 steps, re-plan every step, a tiny model

The first `--interval` steps run the static layout under both variants (the placer needs
statistics first), so the wall-time speedup grows with the run's length; the steady-state
speedup (tokens/s over the logged windows after step 2 x interval) is printed too.

Each round runs static and topo back to back, so round r gives a paired speedup
(geomean over scenarios of static_r / topo_r): `speedup_per_round` and its range
`speedup_range` over `rounds` runs are what the docs quote, next to the median-based `speedup`.

The last line printed is `speedup=<geomean>`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fig_common as fc  # noqa: E402
from moepipe.config import compose_config  # noqa: E402
from moepipe.train.launch import launch  # noqa: E402
from moepipe.train.metrics import write_json  # noqa: E402

MODEL = [
    "model=tiny", "model.n_layers=8", "model.d_model=128", "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=512",
    "moe.capacity_factor=0", "train.seq_len=64", "train.batch_size=16", "train.dtype=fp32", "train.device=cpu",
    "train.num_threads=1", "train.eval_every=0", "train.eval_batches=1", "logger.progress=none", "logger=none",
]
QUICK_MODEL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "moe.expert_hidden=32",
               "train.batch_size=4", "train.seq_len=16", "train.log_every=1"]
EP2 = ["parallel.pp=1", "parallel.ep=2", "parallel.dp=1", "schedule=1f1b", "schedule.microbatches=1", "moe.aux_loss_coef=0"]
SCENARIOS = {
    "skew": EP2 + ["workload.kind=hot_rank", "workload.strength=4.0"],
    "slow": ["parallel.pp=2", "parallel.ep=1", "parallel.dp=1", "schedule=1f1b", "schedule.microbatches=4",
             "topology=local_cpu_slow", "workload.emulate_speed=true"],
    # issue 15: one hot expert per layer that moves to the next expert every --period steps
    "moving": EP2 + ["workload.kind=rotating", "workload.strength=8.0"],
    # the fast path alone, side by side: a fixed hot expert, no re-planning, shadows off vs on
    "shadow_step": EP2 + ["workload.kind=hot_expert", "workload.strength=8.0"],
}
# the dynamic arms' placer settings for moving load (the settings bench_placer's `moving` section
# uses: forecast the next interval's load from a periodic/moving hot spot and plan for the
# expected time over its scenarios); the default window (placer.forecast_window) is kept
MOVING_PLACER = ["placer.forecast=periodic", "placer.objective=expected"]
PLACER_OF = {"moving": MOVING_PLACER}
# which variants each scenario runs; `speedup` stays the geomean of static/topo over skew and slow
VARIANTS_OF = {"skew": ("static", "topo"), "slow": ("static", "topo"), "moving": ("static", "topo", "topo_shadows"),
               "shadow_step": ("static", "static_shadows")}
HEADLINE = ("skew", "slow")


def run_once(overrides: list[str], out: str) -> dict:
    cfg = compose_config(overrides)
    summary = launch(cfg, out)
    events, rate, copies = [], {}, 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("event") == "replan":
                events.append(row)
            elif "tokens_per_s" in row:
                rate[row["step"]] = row["tokens_per_s"]
                copies += row.get("shadow_copies", 0)  # the metrics rank's layers, logged steps only
    return {"wall_s": summary["wall_time_s"], "final_loss": summary["final_train_loss"], "events": events, "tokens_per_s": rate,
            "shadow_copies": copies}


def _layer_worker(rank: int, world: int, overrides: list, iters: int, out: str) -> None:
    """One MoE layer (the bench model's layer 0) on 2 EP ranks under the shadow_step skew: one
    training step's work for that layer (schedule.microbatches forward + backward) with shadows
    off and on, alternating, per-rank wall and CPU seconds. "on" is the runtime's per-step path:
    the decision on the load (the same on both ranks), the weight exchange, the microbatches,
    the gradient return (moepipe.model.shadow_exchange.StepShadows)."""
    import time

    import numpy as np
    import torch
    import torch.distributed as dist

    from moepipe.model.moe import MoELayer
    from moepipe.model.shadow_exchange import StepShadows, shadow_policy
    from moepipe.placement.placers.inputs import inputs_from_config
    from moepipe.placement.plan import static_plan
    from moepipe.placement.shadows import choose_shadows, layer_setup
    from moepipe.train.workload import routing_skew

    cfg = compose_config(overrides)
    inp = inputs_from_config(cfg)
    layer_id = inp.spec.moe_layers[0]
    m = cfg.schedule.microbatches
    holders = static_plan(cfg.model.n_layers, inp.spec.moe_layers, cfg.moe.num_experts, pp=1, ep=world).expert_map[layer_id]
    torch.manual_seed(0)
    layer = MoELayer(cfg.model.d_model, cfg.moe)
    for k in list(layer.experts.keys()):
        if rank not in holders[int(k)]:
            del layer.experts[k]
    layer.set_routing_skew(routing_skew(cfg, 0, source=rank)[layer_id])
    layer.attach_expert_group(holders, rank, dist.group.WORLD)
    layer.stats.set_source(rank, world)
    setup = layer_setup(inp.cost_model, inp.topology, list(range(world)), layer_id, microbatches=m)
    policy = shadow_policy(choose_shadows, setup, cfg.placer.shadow_slots)  # the runtime's decision
    tokens = cfg.train.batch_size * cfg.train.seq_len // world
    x = torch.randn(tokens, cfg.model.d_model, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():  # the load the decision reads: [ep, E] counts, the same on both ranks
        layer(x)
    load = layer.stats.origins.double()
    dist.all_reduce(load)
    load = load.numpy()
    disp = layer.dispatcher
    times = {v: {"wall": [], "cpu": []} for v in ("off", "on")}
    copies, decide = 0, []
    for i in range(iters + 2):  # the first two rounds warm up
        for v in (("off", "on") if i % 2 == 0 else ("on", "off")):
            dist.barrier()
            w0, c0 = time.perf_counter(), time.process_time()
            step = None
            if v == "on":
                chosen = dict(policy(load, holders))
                decide.append(time.process_time() - c0)
                if chosen:
                    step = StepShadows({layer_id: chosen}, {layer_id: holders}, rank, dist.group.WORLD, world, {layer_id: layer.experts},
                                       cfg.model.d_model, cfg.moe.expert_hidden, x)
                    disp.use_shadows(chosen, lambda: step.experts_for(layer_id))
            for xm in x.chunk(m):
                (layer(xm).square().mean() / m).backward()
            if step is not None:
                step.return_grads()
                disp.use_shadows({})
            c1 = time.process_time()
            dist.barrier()
            w1 = time.perf_counter()
            layer.zero_grad(set_to_none=True)
            if i >= 2:
                times[v]["wall"].append(w1 - w0)
                times[v]["cpu"].append(c1 - c0)
    copies = disp.shadow_copies
    gathered = [None] * world
    dist.all_gather_object(gathered, times)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"ranks": gathered, "shadow_copies": copies, "holders": holders, "load": load.tolist(),
                       "decision_cpu_s": float(np.median(decide)), "microbatches": m}, f)


def layer_side_by_side(overrides: list, iters: int, tmp: str) -> dict:
    """CPU seconds of one MoE layer's forward + backward on the busiest EP rank, shadows off vs on
    (2 gloo ranks). Per-rank CPU time is what a rank computes, which is what a shadow
    rebalances; it stays meaningful on a loaded machine, where wall time measures the load."""
    from moepipe.parallel.spawn import run_distributed

    import statistics as st

    out = os.path.join(tmp, "layer.json")
    run_distributed(_layer_worker, 2, overrides, iters, out, timeout=600)
    with open(out) as f:
        res = json.load(f)
    per = {v: {"cpu_max_rank_s": st.median(max(r[v]["cpu"][i] for r in res["ranks"]) for i in range(iters)),
               "cpu_sum_ranks_s": st.median(sum(r[v]["cpu"][i] for r in res["ranks"]) for i in range(iters)),
               "wall_s": st.median(res["ranks"][0][v]["wall"])} for v in ("off", "on")}
    return {**per, "iters": iters, "shadow_copies": res["shadow_copies"], "decision_cpu_s": res["decision_cpu_s"],
            "microbatches": res["microbatches"],
            "cpu_ratio_off_over_on": per["off"]["cpu_max_rank_s"] / per["on"]["cpu_max_rank_s"],
            "wall_ratio_off_over_on": per["off"]["wall_s"] / per["on"]["wall_s"]}


def _paired_worker(rank: int, world: int, arms: dict, steps: int, out: str) -> None:
    """The moving scenario's arms in one set of 2 gloo workers, interleaved step by step: every
    arm's trainer (DistributedTrainer) lives at once, and step s of each runs back to back (the
    arms' order rotated every step), so load from other processes on the machine falls on all
    arms alike. Per step and arm: the wall seconds of the step and its re-plan (+ migration)
    between barriers, and this rank's CPU seconds of each."""
    import time

    import torch
    import torch.distributed as dist

    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer

    torch.set_num_threads(1)
    mesh = build_mesh(1, world, 1)
    trainers = {arm: DistributedTrainer(compose_config(overrides), mesh) for arm, overrides in arms.items()}
    res = {arm: {"wall": [], "step": [], "replan": [], "migrations": 0} for arm in arms}
    names = list(arms)
    for s in range(steps):
        for arm in names[s % len(names):] + names[: s % len(names)]:
            dist.barrier()
            w, c = time.perf_counter(), time.process_time()
            trainers[arm].train_step(s)
            c1 = time.process_time()
            events = trainers[arm].after_step(s + 1)
            c2 = time.process_time()
            dist.barrier()
            r = res[arm]
            r["wall"].append(time.perf_counter() - w)
            r["step"].append(c1 - c)
            r["replan"].append(c2 - c1)
            r["migrations"] += sum(bool(e.get("migrate")) for e in events)
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)


def paired_moving(arms: dict, steps: int, tmp: str) -> dict:
    """The moving scenario's arms interleaved step by step in one set of workers
    (`_paired_worker`): per arm the wall seconds over all steps (rank 0's, steps + re-plans; the
    barriers make it the slower rank's) and the busiest rank's CPU seconds (max over the 2 ranks
    per step, summed), each as static / arm. The `uniform` arm (the same model, tokens and steps
    with the routing skew off) is the ceiling: the time of perfectly even expert load, which no
    placement of the skewed load can beat."""
    from moepipe.parallel.spawn import run_distributed

    out = os.path.join(tmp, "paired_moving.json")
    run_distributed(_paired_worker, 2, arms, steps, out, timeout=3600)
    with open(out) as f:
        ranks = json.load(f)
    table = {}
    for arm in arms:
        step = sum(max(r[arm]["step"][i] for r in ranks) for i in range(steps))
        replan = sum(max(r[arm]["replan"][i] for r in ranks) for i in range(steps))
        table[arm] = {"wall_s": sum(ranks[0][arm]["wall"]), "step_cpu_s": step, "replan_cpu_s": replan, "total_cpu_s": step + replan,
                      "migrations": ranks[0][arm]["migrations"]}
    for arm in arms:
        table[arm]["speedup_vs_static"] = table["static"]["wall_s"] / table[arm]["wall_s"]
        table[arm]["cpu_speedup_vs_static"] = table["static"]["total_cpu_s"] / table[arm]["total_cpu_s"]
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--replica-slots", type=int, default=1)
    ap.add_argument("--shadow-slots", type=int, default=1, help="placer.shadow_slots of the *_shadows variants")
    ap.add_argument("--period", type=int, default=20, help="moving: steps between hot-spot moves")
    ap.add_argument("--shadow-step-steps", type=int, default=40, help="shadow_step: steps per run (no re-planning there)")
    ap.add_argument("--layer-iters", type=int, default=30, help="shadow_step: timed forward+backward rounds of one MoE layer")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--paired-moving", action=argparse.BooleanOptionalAction, default=None,
                    help="(default: on when the moving scenario runs) also run the moving scenario's arms (static, static + shadows, topo, "
                         "topo + shadows, and `uniform`: the routing skew off, the ceiling) interleaved step by step in one set of workers; "
                         "wall and busiest-rank CPU seconds (key moving_paired)")
    fc.add_output_args(ap, os.path.join(ROOT, "results", "bench_dynamic.json"))
    args = ap.parse_args()
    if args.paired_moving is None:  # wall times of separate runs on a shared machine measure the others' load too
        args.paired_moving = "moving" in args.scenarios.split(",")
    if args.quick:
        args.steps, args.interval, args.rounds, args.period, args.shadow_step_steps, args.layer_iters = 4, 1, 1, 2, 4, 2
    scenarios = [x for x in args.scenarios.split(",") if x]
    if not scenarios or set(scenarios) - set(SCENARIOS):
        ap.error(f"--scenarios={args.scenarios}: choose from {','.join(SCENARIOS)}")
    args.out = fc.check_output(args)
    prov = fc.provenance(args, {"model": MODEL + (QUICK_MODEL if args.quick else []), "scenarios": SCENARIOS}, seed=0)

    model = MODEL + (QUICK_MODEL if args.quick else [])
    common = model + [f"train.steps={args.steps}"]
    topo = ["placer=topo", f"placer.interval={args.interval}", f"placer.replica_slots={args.replica_slots}"]
    shadows = [f"placer.shadow_slots={args.shadow_slots}"]
    all_variants = {"static": ["placer=static"], "topo": topo, "topo_shadows": topo + shadows, "static_shadows": ["placer=static"] + shadows}
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scen in scenarios:
            extra = SCENARIOS[scen] + (["workload.period=%d" % args.period] if scen == "moving" else [])
            steps = args.shadow_step_steps if scen == "shadow_step" else args.steps
            base = model + [f"train.steps={steps}"]
            # quick: the moving scenario skips topo without shadows (same code path as skew's topo)
            variants = {v: all_variants[v] + (PLACER_OF.get(scen, []) if v.startswith("topo") else [])
                        for v in VARIANTS_OF[scen] if not (args.quick and scen == "moving" and v == "topo")}
            dyn = VARIANTS_OF[scen][-1]  # the dynamic variant static is compared with
            runs = {v: [] for v in variants}
            for r in range(args.rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for v in order:
                    res = run_once(base + extra + variants[v], os.path.join(tmp, f"{scen}_{v}_{r}"))
                    runs[v].append(res)
                    print(f"{scen:5s} {v:6s} round {r}: {res['wall_s']:.2f} s, {sum(e.get('migrate', False) for e in res['events'])} migrations, "
                          f"{res['shadow_copies']} shadow copies", flush=True)
            wall = {v: statistics.median(x["wall_s"] for x in runs[v]) for v in variants}
            # steady state: logged windows after the first re-plan window, same steps for both
            logged = sorted(runs["static"][0]["tokens_per_s"])
            late = [st for st in logged if st > 2 * args.interval] or logged[-1:]  # quick runs: the last window
            steady = {v: statistics.median(statistics.fmean(x["tokens_per_s"][st] for st in late) for x in runs[v]) for v in variants}
            topo_events = runs[dyn][0]["events"]
            moved = [e for e in topo_events if e.get("migrate")]
            table[scen] = {
                "overrides": extra,
                "dynamic_variant": dyn,
                "wall_s": wall,
                "all_wall_s": {v: [x["wall_s"] for x in runs[v]] for v in variants},
                "speedup": wall["static"] / wall[dyn],
                "speedup_per_round": [s / t for s, t in zip((x["wall_s"] for x in runs["static"]), (x["wall_s"] for x in runs[dyn]))],
                "steady_state_speedup": steady[dyn] / steady["static"],
                "speedup_vs_static": {v: wall["static"] / wall[v] for v in variants if v != "static"},
                "shadow_copies": {v: runs[v][0]["shadow_copies"] for v in variants},
                "final_loss": {v: runs[v][0]["final_loss"] for v in variants},
                "migrations": len(moved),
                "bytes_moved": sum(e.get("bytes_moved", 0) for e in moved),
                "migration_s": sum(e.get("migration_s", 0.0) for e in moved),
                "solve_s": sum(e.get("solve_s", 0.0) for e in topo_events),
                "events": [{k: e[k] for k in e if k != "plan"} for e in topo_events],
            }
            print(f"{scen}: " + ", ".join(f"{v} {wall[v]:.2f} s" for v in variants) + f", static/{dyn} {table[scen]['speedup']:.3f} "
                  f"(steady state after step {2 * args.interval}: {table[scen]['steady_state_speedup']:.3f})", flush=True)
        if "shadow_step" in scenarios:
            table_layer = layer_side_by_side(model + SCENARIOS["shadow_step"] + [f"placer.shadow_slots={args.shadow_slots}"],
                                             args.layer_iters, tmp)
            print(f"shadow_step layer: busiest rank's CPU s per step (fwd+bwd; on: + decision "
                  f"{table_layer['decision_cpu_s'] * 1e3:.2f} ms, weight exchange, gradient return) off {table_layer['off']['cpu_max_rank_s'] * 1e3:.2f} ms, "
                  f"on {table_layer['on']['cpu_max_rank_s'] * 1e3:.2f} ms; wall off {table_layer['off']['wall_s'] * 1e3:.2f} ms, "
                  f"on {table_layer['on']['wall_s'] * 1e3:.2f} ms", flush=True)
            table["shadow_step"]["layer"] = table_layer
        if args.paired_moving:
            extra = SCENARIOS["moving"] + [f"workload.period={args.period}"]
            arms = {"static": all_variants["static"], "static_shadows": all_variants["static_shadows"],
                    "topo": all_variants["topo"] + MOVING_PLACER, "topo_shadows": all_variants["topo_shadows"] + MOVING_PLACER}
            arms = {a: model + [f"train.steps={args.steps}"] + extra + v for a, v in arms.items()}
            arms["uniform"] = model + [f"train.steps={args.steps}"] + [x for x in extra if not x.startswith("workload.")] + all_variants["static"]
            paired = paired_moving(arms, args.steps, tmp)
            for a, row in paired.items():
                print(f"moving paired {a:14s}: wall {row['wall_s']:.2f} s (static/{a} {row['speedup_vs_static']:.3f}); busiest rank CPU "
                      f"{row['step_cpu_s']:.2f} s in steps + {row['replan_cpu_s']:.2f} s in re-plans ({row['migrations']} migrations), "
                      f"static/{a} {row['cpu_speedup_vs_static']:.3f}", flush=True)
    head = [table[x] for x in HEADLINE if x in table] or list(table.values())
    speedup = math.exp(statistics.mean(math.log(t["speedup"]) for t in head))
    steady = math.exp(statistics.mean(math.log(t["steady_state_speedup"]) for t in head))
    per_round = [math.exp(statistics.mean(math.log(t["speedup_per_round"][r]) for t in head)) for r in range(args.rounds)]
    extra_keys = {}
    if "moving" in table:  # issue 15: dynamic with shadows vs static, and without shadows for context
        extra_keys["speedup_moving"] = table["moving"]["speedup"]
        if "topo" in table["moving"]["speedup_vs_static"]:
            extra_keys["speedup_moving_topo_without_shadows"] = table["moving"]["speedup_vs_static"]["topo"]
        extra_keys["period"] = args.period
    if "shadow_step" in table:  # one machine's loopback: the weight/gradient transfers cost almost nothing here
        extra_keys["shadow_step_ratio"] = table["shadow_step"]["speedup"]
        extra_keys["shadow_step_steady_ratio"] = table["shadow_step"]["steady_state_speedup"]
        extra_keys["shadow_layer_cpu_ratio"] = table["shadow_step"]["layer"]["cpu_ratio_off_over_on"]
        extra_keys["shadow_layer_wall_ratio"] = table["shadow_step"]["layer"]["wall_ratio_off_over_on"]
    if args.paired_moving:  # interleaved step by step: the same background load on every arm
        extra_keys["speedup_moving_paired"] = paired["topo_shadows"]["speedup_vs_static"]
        extra_keys["speedup_moving_ceiling"] = paired["uniform"]["speedup_vs_static"]
        extra_keys["moving_paired"] = paired
    for k, v in extra_keys.items():
        print(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" if not isinstance(v, dict) else f"{k}: see the JSON")
    print(f"steady_state_speedup={steady:.3f}")
    print(f"speedup per round (geomean over {', '.join(HEADLINE)} of paired static/topo): {', '.join(f'{x:.3f}' for x in per_round)}")
    write_json(args.out, {"speedup": speedup, "steady_state_speedup": steady, "speedup_per_round": per_round,
                          "speedup_range": [min(per_round), max(per_round)], **extra_keys, "scenarios": table, "steps": args.steps,
                          "interval": args.interval, "rounds": args.rounds, "shadow_slots": args.shadow_slots,
                          "model_overrides": common, "provenance": prov})
    print(f"speedup={speedup:.3f}")


if __name__ == "__main__":
    main()
