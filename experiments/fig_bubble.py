"""Figure 1: pipeline bubble fraction vs microbatches, GPipe and 1F1B (Huang et al. 2019;
Narayanan et al. 2019), against (p-1)/(m+p-1).

- formula: (p-1)/(m+p-1);
- simulated: moepipe.sim.simulate on uniform stages (F = I = W = 1 ms per block, one block per
  stage) with free communication, for p in --sim-pp and m in --sim-microbatches;
- measured: real training steps of the tiny MoE model, pp=--pp gloo processes on this CPU, one
  thread each; bubble = 1 - sum_r busy_r / (pp * makespan) of schedule.step, busy = time inside
  the stage's forward/backward/loss calls (experiments/fig_common.py); median over timed steps;
- replay: the simulator's engine run with the measured median duration of each (stage, kind)
  action and free transfers: the part of the measured bubble that stage imbalance explains
  (the rest is the runtime's per-action cost, transfers and noise).
Also writes Gantt charts (figures/fig_gantt.png): the simulated uniform schedules and the
measured timeline of the median-bubble timed step.

    .venv/bin/python experiments/fig_bubble.py            # small: pp=2 real runs, ~1-2 min on 2 cores
    # GPU cluster (one process per GPU; NCCL is chosen by moepipe's launcher only in moepipe-train,
    # so the full variant is the same script with a larger model and more ranks on one node):
    .venv/bin/python experiments/fig_bubble.py --full     # pp=4, m=4..32, model=small, train.device=auto
    .venv/bin/python experiments/fig_bubble.py --quick --out /tmp/x/fig_bubble.json   # test-sized: m=2, 1 round
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fig_common as fc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=2, help="pipeline ranks of the real runs (one core each)")
    ap.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8, 16], help="measured m (moepipe requires m >= pp)")
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b"], choices=["gpipe", "1f1b"])
    ap.add_argument("--sim-pp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--sim-microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per job per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[], help="more config overrides for the real runs (e.g. model=small)")
    ap.add_argument("--full", action="store_true", help="GPU-cluster variant: pp=4, m=1..32, model=small, device auto")
    ap.add_argument("--no-measure", action="store_true", help="formula and simulation only")
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_bubble.json"))
    args = ap.parse_args()
    if args.quick:
        args.microbatches, args.sim_pp, args.sim_microbatches, args.rounds, args.batch_size, args.seq_len = [2], [2], [1, 2], 1, 4, 16
    args.out = fc.check_output(args)
    if args.full:
        args.pp, args.microbatches, args.batch_size, args.seq_len = 4, [4, 8, 16, 32], 128, 512
        args.extra = ["model=small", "train.device=auto", "train.num_threads=0"] + args.extra
    t_start = time.perf_counter()

    rows = []
    for pp in args.sim_pp:
        for m in args.sim_microbatches:
            for sched in args.schedules:
                sim = fc.simulate_uniform(sched, pp, m)
                rows.append({"schedule": sched, "pp": pp, "m": m, "formula": fc.bubble_formula(pp, m),
                             "simulated": sim.bubble_fraction, "measured": None, "replay": None})

    extra = [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.seed={args.seed}", *args.extra]
    jobs = {f"{s}_m{m}": fc.pipeline_overrides(s, args.pp, m, extra=extra) for s in args.schedules for m in args.microbatches}
    measured = {} if args.no_measure else fc.measure_pipeline(jobs, args.pp, rounds=args.rounds, steps=args.steps, memory=False)
    for s in args.schedules:
        for m in args.microbatches:
            name = f"{s}_m{m}"
            row = next((r for r in rows if r["schedule"] == s and r["pp"] == args.pp and r["m"] == m), None)
            if row is None:
                sim = fc.simulate_uniform(s, args.pp, m)
                row = {"schedule": s, "pp": args.pp, "m": m, "formula": fc.bubble_formula(args.pp, m), "simulated": sim.bubble_fraction}
                rows.append(row)
            if name in measured:
                x = measured[name]
                row.update(measured=x["bubble_measured"], replay=fc.replay_bubble(s, args.pp, 1, m, x["action_median_s"]),
                           makespan_s=x["makespan_s"], busy_s_per_rank=x["busy_s_per_rank"], bubble_per_step=x["bubble_per_step"],
                           action_median_s=x["action_median_s"])

    # Gantt data: simulated uniform schedules at p=4, m=8, and the measured last steps at m=max.
    gantt = {}
    for s in args.schedules:
        sim = fc.simulate_uniform(s, 4, 8)
        gantt[f"{s} simulated (uniform stages, p=4, m=8): bubble {sim.bubble_fraction:.1%}"] = {"pp": 4, "rows": fc.timeline_rows(sim)}
    m_g = max(args.microbatches)
    for s in args.schedules:
        x = measured.get(f"{s}_m{m_g}")
        if x:
            gantt[f"{s} measured (tiny, pp={args.pp}, m={m_g}, CPU): bubble {x['typical_step_bubble']:.1%}"] = {"pp": args.pp, "rows": x["timeline_typical_step"]}

    payload = {
        "figure": "bubble fraction vs microbatches (GPipe, 1F1B)",
        "measured_pp": args.pp,
        "definitions": {
            "formula": "(p-1)/(m+p-1)",
            "simulated": "moepipe.sim.simulate, uniform stages (F=I=W=1ms per block, one block per stage), free communication",
            "measured": "1 - sum_r busy_r / (pp * makespan) of schedule.step in real runs; busy = wall time in stage forward/backward/loss "
                        "calls; median over timed steps (see experiments/fig_common.py)",
            "replay": "simulator engine with the measured median (stage, kind) action durations and free transfers",
        },
        "gantt": gantt,
        "provenance": fc.provenance(args, {k: v for k, v in jobs.items()}, args.seed),
        "wall_s": time.perf_counter() - t_start,
    }
    path, figs = fc.save_and_draw("fig_bubble", payload, rows, args)
    print(f"{'schedule':<7} {'m':>3} {'formula':>8} {'sim':>8} {'measured':>9} {'replay':>8}")
    for r in rows:
        if r["pp"] == args.pp:
            meas = f"{r['measured']:.3f}" if r.get("measured") is not None else "-"
            rep = f"{r['replay']:.3f}" if r.get("replay") is not None else "-"
            print(f"{r['schedule']:<7} {r['m']:>3} {r['formula']:>8.3f} {r['simulated']:>8.3f} {meas:>9} {rep:>8}")
    worst_sim = max(abs(r["simulated"] - r["formula"]) for r in rows)
    print(f"wrote {path} and {', '.join(figs)} in {payload['wall_s']:.0f} s")
    meas_rows = [r for r in rows if r.get("measured") is not None]
    if meas_rows:
        print(f"median measured - formula = {statistics.median(r['measured'] - r['formula'] for r in meas_rows):+.3f}")
    fc.headline("max_abs_simulated_minus_formula", worst_sim, ".2e")


if __name__ == "__main__":
    main()
