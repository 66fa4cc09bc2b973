"""Figure 3: interleaved 1F1B bubble vs virtual stages per rank (Narayanan et al. 2021,
Megatron-LM): with v model chunks per rank the bubble time shrinks by v, i.e.
bubble / ideal compute = (p-1)/(v*m), bubble fraction ((p-1)/v)/(m+(p-1)/v).

- formula and simulated: torch's ScheduleInterleaved1F1B order (what the runtime executes) in
  moepipe.sim on uniform chunks with free communication; v=1 is plain 1F1B;
- measured: real pp=2 CPU runs of the tiny model with 8 blocks (so v=4 still has one block per
  chunk), m=8, v in --measured-v; same bubble definition as figure 1, plus the engine replay of
  the measured action durations. On a CPU each extra chunk adds per-action runtime cost and a
  point-to-point hop, which the formula leaves out.

    .venv/bin/python experiments/fig_interleaved.py           # ~1-2 min on 2 cores
    .venv/bin/python experiments/fig_interleaved.py --full    # GPU node: pp=4, m=16, model=small with 16 blocks, v=1,2,4
    .venv/bin/python experiments/fig_interleaved.py --measured-v  # simulation only (no wall-clock measurement)
    .venv/bin/python experiments/fig_interleaved.py --quick --out /tmp/x/fig_interleaved.json   # test-sized: m=2, v=1,2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fig_common as fc  # noqa: E402


def schedule_for(v: int) -> str:
    return "1f1b" if v == 1 else "interleaved_1f1b"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-pp", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--sim-microbatches", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--sim-v", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--measured-v", type=int, nargs="*", default=[1, 2, 4], help="empty: simulation only")
    ap.add_argument("--layers", type=int, default=8, help="model.n_layers of the measured runs (>= pp * max v)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--full", action="store_true", help="GPU variant: pp=4, m=16, model=small with 16 layers, device auto")
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_interleaved.json"))
    args = ap.parse_args()
    if args.quick:
        args.sim_pp, args.sim_microbatches, args.sim_v, args.microbatches = [4], [8], [1, 2], 2
        args.measured_v, args.layers, args.rounds, args.batch_size, args.seq_len = [1, 2], 4, 1, 4, 16
    args.out = fc.check_output(args)
    if args.full:
        args.pp, args.microbatches, args.layers, args.batch_size, args.seq_len = 4, 16, 16, 64, 1024
        args.extra = ["model=small", "train.device=auto", "train.num_threads=0"] + args.extra
    t_start = time.perf_counter()

    rows = []
    for p in args.sim_pp:
        for m in args.sim_microbatches:
            for v in args.sim_v:
                sim = fc.simulate_uniform(schedule_for(v), p, m, v)
                f = sim.bubble_fraction
                rows.append({"pp": p, "m": m, "v": v, "schedule": schedule_for(v), "fraction_formula": fc.bubble_formula(p, m, v),
                             "fraction_simulated": f, "ratio_formula": fc.bubble_ratio_formula(p, m, v), "ratio_simulated": f / (1 - f),
                             "pipeline_time_units": sim.pipeline_time_s / 1e-3})

    measured_rows, jobs = [], {}
    if args.measured_v:
        extra = [f"model.n_layers={args.layers}", f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                 f"train.seed={args.seed}", *args.extra]
        jobs = {f"v{v}": fc.pipeline_overrides(schedule_for(v), args.pp, args.microbatches, v=v, extra=extra) for v in args.measured_v}
        measured = fc.measure_pipeline(jobs, args.pp, rounds=args.rounds, steps=args.steps, memory=True)
        for v in args.measured_v:
            x = measured[f"v{v}"]
            measured_rows.append({
                "pp": args.pp, "m": args.microbatches, "v": v, "schedule": schedule_for(v),
                "formula": fc.bubble_formula(args.pp, args.microbatches, v), "measured": x["bubble_measured"],
                "replay": fc.replay_bubble(schedule_for(v), args.pp, v, args.microbatches, x["action_median_s"]),
                "makespan_s": x["makespan_s"], "busy_s_per_rank": x["busy_s_per_rank"], "bubble_per_step": x["bubble_per_step"],
                "peak_saved_bytes_per_rank": x["peak_saved_bytes_per_rank"], "action_median_s": x["action_median_s"],
            })
    payload = {
        "figure": "interleaved 1F1B: bubble vs virtual stages",
        "measured_layers": args.layers,
        "definitions": {
            "ratio": "bubble time / ideal compute time; formula (p-1)/(v*m)",
            "fraction": "bubble time / pipeline time; formula ((p-1)/v)/(m+(p-1)/v)",
            "simulated": "torch's Interleaved1F1B order in moepipe.sim.simulate, uniform chunks (F=I=W=1ms), free communication",
            "measured": "as figure 1: 1 - sum_r busy_r / (pp * makespan) of schedule.step in real runs",
        },
        "measured": measured_rows,
        "provenance": fc.provenance(args, jobs, args.seed),
        "wall_s": time.perf_counter() - t_start,
    }
    path, figs = fc.save_and_draw("fig_interleaved", payload, rows, args)
    print(f"{'p':>2} {'m':>3} {'v':>2} {'ratio formula':>13} {'ratio sim':>9}")
    for r in rows:
        print(f"{r['pp']:>2} {r['m']:>3} {r['v']:>2} {r['ratio_formula']:>13.4f} {r['ratio_simulated']:>9.4f}")
    for r in measured_rows:
        print(f"measured pp={r['pp']} m={r['m']} v={r['v']}: bubble {r['measured']:.3f} (formula {r['formula']:.3f}, replay {r['replay']:.3f}), "
              f"pipeline {r['makespan_s'] * 1e3:.0f} ms, peak saved MiB/rank {[round(b / 2**20, 1) for b in r['peak_saved_bytes_per_rank']]}")
    print(f"wrote {path} and {', '.join(figs)} in {payload['wall_s']:.0f} s")
    fc.headline("max_abs_ratio_simulated_minus_formula", max(abs(r['ratio_simulated'] - r['ratio_formula']) for r in rows), ".2e")


if __name__ == "__main__":
    main()
