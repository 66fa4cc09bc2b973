"""Reproduction figure 9: Chimera (Li and Hoefler, SC'21) against 1F1B, bubble and throughput (issue 16).

Chimera runs two replicas of the model as pipelines in opposite directions (schedule=chimera on
moepipe's executor): rank r holds stage r of one replica and stage p-1-r of the other, half the
microbatches go each way, and the two copies of each stage sum their gradients before the step.

- formula: 1F1B (p-1)/(m+p-1); Chimera (p-2)/(2m+p-2) (the paper's, for equal forward and
  backward times);
- simulated: moepipe.sim's engine on the schedules' own orders (the ones the executor runs),
  uniform stages, free communication, with B = F (the formula's setting) and with B = 2F
  (`fig_common.simulate_uniform`: F = I = W per block), for p in --sim-pp, m in p, 2p, 4p;
- measured: real training steps of the tiny MoE model, pp=2 gloo processes on this CPU, one
  thread each, both schedules on moepipe's executor in the same processes, timed in rotation;
  bubble = 1 - sum_r busy_r / (pp * makespan) of schedule.step (busy: time inside the stages'
  forward/backward and the loss, experiments/fig_common.Probe); median over timed steps;
  throughput = tokens / makespan of schedule.step, relative to 1F1B's;
- replay: the engine with each measured (stage, kind) median action time: the part of the
  measured bubble that stage imbalance explains.
The step outside schedule.step (Chimera's replica all-reduce wait, its optimizer step over two
weight copies, the gradient sync) is not in these times.

    .venv/bin/python experiments/fig_chimera.py             # results/fig_chimera.{json,csv}, figures/fig_chimera.png
    .venv/bin/python experiments/fig_chimera.py --quick --out /tmp/f/fig_chimera.json

The last line printed is `max_abs_simulated_minus_formula_chimera=<over the B = F rows>`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fig_common as fc  # noqa: E402
import numpy as np  # noqa: E402

SCHEDULES = ("1f1b", "chimera")


def formula(schedule: str, p: int, m: int) -> float:
    return (p - 1) / (m + p - 1) if schedule == "1f1b" else (p - 2) / (2 * m + p - 2)


def simulated_equal_fb(schedule: str, p: int, m: int) -> float:
    """The engine on the schedule's order, every stage F = B = 1 (no W, free transfers)."""
    from moepipe.sim import schedule_order, simulate_order

    order, s2r = schedule_order(schedule, p, 1, m)
    res = simulate_order(order, s2r, m, np.tile([1.0, 1.0, 0.0], (len(s2r), 1)))
    return float(1.0 - res.busy.sum() / (p * res.makespan))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=2, help="pipeline ranks of the real runs (one core each)")
    ap.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8], help="measured m (even: half run each way)")
    ap.add_argument("--sim-pp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per job per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[], help="more config overrides for the real runs")
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_chimera.json"))
    args = ap.parse_args()
    if args.quick:
        args.microbatches, args.sim_pp, args.rounds, args.steps, args.batch_size, args.seq_len = [2], [2, 4], 1, 1, 4, 16
        args.extra = fc.QUICK_MODEL + args.extra
    args.out = fc.check_output(args)
    t_start = time.perf_counter()

    rows = []
    for p in args.sim_pp:
        for m in (p, 2 * p, 4 * p):
            for s in SCHEDULES:
                rows.append({"schedule": s, "pp": p, "m": m, "formula": formula(s, p, m), "simulated": simulated_equal_fb(s, p, m),
                             "simulated_b2f": fc.simulate_uniform(s, p, m).bubble_fraction, "measured": None, "replay": None})

    extra = [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.seed={args.seed}", "schedule.executor=moepipe",
             *args.extra]
    jobs = {f"{s}_m{m}": fc.pipeline_overrides(s, args.pp, m, v=1, extra=extra) for s in SCHEDULES for m in args.microbatches}
    measured = fc.measure_pipeline(jobs, args.pp, rounds=args.rounds, steps=args.steps, memory=False)
    tokens = args.batch_size * args.seq_len
    for s in SCHEDULES:
        for m in args.microbatches:
            row = next((r for r in rows if r["schedule"] == s and r["pp"] == args.pp and r["m"] == m), None)
            if row is None:
                row = {"schedule": s, "pp": args.pp, "m": m, "formula": formula(s, args.pp, m), "simulated": simulated_equal_fb(s, args.pp, m),
                       "simulated_b2f": fc.simulate_uniform(s, args.pp, m).bubble_fraction}
                rows.append(row)
            x = measured[f"{s}_m{m}"]
            row.update(measured=x["bubble_measured"], replay=fc.replay_bubble(s, args.pp, 1, m, x["action_median_s"]),
                       makespan_s=x["makespan_s"], tokens_per_s=tokens / x["makespan_s"], busy_s_per_rank=x["busy_s_per_rank"],
                       bubble_per_step=x["bubble_per_step"])
    throughput = {}
    for m in args.microbatches:
        one, two = (next(r for r in rows if r["schedule"] == s and r["pp"] == args.pp and r["m"] == m) for s in SCHEDULES)
        throughput[str(m)] = {
            "formula": (1 - two["formula"]) / (1 - one["formula"]),  # same work per rank: the busy fractions' ratio
            "simulated": (1 - two["simulated"]) / (1 - one["simulated"]),
            "measured": one["makespan_s"] / two["makespan_s"],
        }
    payload = {
        "figure": "bubble fraction and throughput, Chimera vs 1F1B",
        "measured_pp": args.pp,
        "throughput_relative_to_1f1b": throughput,
        "definitions": {
            "formula": "1F1B (p-1)/(m+p-1); Chimera (p-2)/(2m+p-2)",
            "simulated": "engine on the schedule's order, uniform stages, F = B, free communication",
            "simulated_b2f": "moepipe.sim.simulate, uniform stages with B = 2F (F = I = W per block), free communication",
            "measured": "1 - sum_r busy_r / (pp * makespan) of schedule.step, tiny model on CPU gloo, median over timed steps",
            "replay": "engine with the measured median (stage, kind) action durations and free transfers",
            "throughput": "1F1B's step time / Chimera's (schedule.step only; formula and simulated: same work per rank)",
        },
        "provenance": fc.provenance(args, jobs, args.seed),
        "wall_s": time.perf_counter() - t_start,
    }
    # drawn here, not through analysis.figures.DRAWERS: that list is for figures whose results are committed
    from analysis.fig_chimera import draw_chimera

    path = fc.save_results(os.path.splitext(os.path.basename(args.out))[0], payload, rows, out_dir=fc.out_dir_of(args))
    with open(path) as f:
        figs = draw_chimera(json.load(f), fc.figures_dir_of(args))
    print(f"{'schedule':<8} {'p':>2} {'m':>3} {'formula':>8} {'sim':>7} {'sim B=2F':>9} {'measured':>9} {'replay':>7}")
    for r in rows:
        meas = f"{r['measured']:.3f}" if r.get("measured") is not None else "-"
        rep = f"{r['replay']:.3f}" if r.get("replay") is not None else "-"
        print(f"{r['schedule']:<8} {r['pp']:>2} {r['m']:>3} {r['formula']:>8.3f} {r['simulated']:>7.3f} {r['simulated_b2f']:>9.3f} {meas:>9} {rep:>7}")
    for m, t in throughput.items():
        print(f"throughput Chimera / 1F1B at pp={args.pp}, m={m}: formula {t['formula']:.3f}, simulated {t['simulated']:.3f}, measured {t['measured']:.3f}")
    print(f"wrote {path} and {', '.join(figs)} in {payload['wall_s']:.0f} s")
    worst = max(abs(r["simulated"] - r["formula"]) for r in rows if r["schedule"] == "chimera")
    fc.headline("max_abs_simulated_minus_formula_chimera", worst, ".2e")


if __name__ == "__main__":
    main()
