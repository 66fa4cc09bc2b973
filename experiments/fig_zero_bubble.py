"""Table/figure 4: zero-bubble schedules vs 1F1B (Qi et al. 2023), bubble and activation memory.

Zero-bubble schedules split each backward into I (gradient w.r.t. the input, on the critical
path) and W (gradient w.r.t. the weights, deferrable) and fill the pipeline's idle slots with W.

- simulated: moepipe.sim on the same model for every schedule (2 blocks per pipeline rank,
  F = I = W = 1 ms per block, free communication): 1f1b (one 2-block stage per rank),
  interleaved_1f1b, interleaved_zb, zbv and dualpipev (two 1-block chunks per rank; torch's
  orders); bubble fraction, pipeline time, and peak activations of the fullest rank in units of
  one microbatch through one rank's share of the model (a chunk counts 1/2), also relative to
  1F1B. Formula for the ZB orders at F = I = W: (p-1)/(6m+p-1) (1F1B: (p-1)/(m+p-1)).
- measured: real pp=2 CPU runs of the tiny model (4 blocks), m=8, same definitions as figures 1
  and 2 (bubble from timed actions, peak saved-for-backward bytes per rank), relative to 1F1B.
  On CPU the split backward (I + W) costs more than the fused one, which the measured pipeline
  time shows; the bubble is what the schedules are about.
  The split-backward orders (interleaved_zb, zbv, dualpipev) are measured twice in the same
  processes: on torch's runtime (keeps a microbatch's graph from I to W) and on moepipe's
  executor with lean W (schedule.lean_weight_grad: keeps each Linear's input and output
  gradient; parallel/weight_grad.py), the `runtime` field of each measured row.

    .venv/bin/python experiments/fig_zero_bubble.py          # ~2 min on 2 cores
    .venv/bin/python experiments/fig_zero_bubble.py --full   # GPU node: measured pp=4, m=16, model=small
    .venv/bin/python experiments/fig_zero_bubble.py --quick --out /tmp/x/fig_zero_bubble.json   # test-sized: m=4, 1 round
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fig_common as fc  # noqa: E402

SCHEDULES = ("1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
ZB = ("interleaved_zb", "zbv", "dualpipev")  # the orders with split backwards (I, W)
LEAN = "+lean"  # job suffix: the order on moepipe's executor with lean W


def v_of(name: str) -> int:
    return 1 if name in ("gpipe", "1f1b") else 2


def formula(name: str, p: int, m: int) -> float | None:
    """Closed forms at F = I = W (none is derived here for DualPipeV's overlapped pairs)."""
    if name in ("interleaved_zb", "zbv"):
        return fc.zb_bubble_formula(p, m)
    if name in ("1f1b", "interleaved_1f1b"):
        return fc.bubble_formula(p, m, v_of(name))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-pp", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--sim-microbatches", type=int, default=8)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--no-lean", action="store_true", help="skip the ZB orders on moepipe's executor with lean W")
    ap.add_argument("--full", action="store_true", help="GPU variant: measured pp=4, m=16, model=small (8 layers), device auto")
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_zero_bubble.json"))
    args = ap.parse_args()
    if args.quick:  # dualpipev needs m >= 2p
        args.sim_pp, args.sim_microbatches, args.microbatches, args.rounds, args.batch_size, args.seq_len = [2], 4, 4, 1, 4, 16
    args.out = fc.check_output(args)
    if args.full:
        args.pp, args.microbatches, args.batch_size, args.seq_len = 4, 16, 64, 1024
        args.extra = ["model=small", "model.n_layers=8", "train.device=auto", "train.num_threads=0"] + args.extra
    t_start = time.perf_counter()
    m = args.sim_microbatches

    rows = []
    for p in args.sim_pp:
        ref = None
        for name in args.schedules:
            mm = max(m, 2 * p) if name == "dualpipev" else m  # torch's DualPipeV needs m >= 2p
            sim = fc.simulate_uniform(name, p, mm, v_of(name), n_layers=2 * p)
            mem = fc.inflight_units(name, p, mm, v_of(name))
            row = {"schedule": name, "pp": p, "m": mm, "v": v_of(name), "bubble_simulated": sim.bubble_fraction,
                   "bubble_formula": formula(name, p, mm),
                   "pipeline_time_ms": sim.pipeline_time_s * 1e3, "memory_units_per_rank": mem["peak_units_per_rank"],
                   "memory_units_max_rank": max(mem["peak_units_per_rank"])}
            ref = ref or row
            row["memory_rel_1f1b"] = row["memory_units_max_rank"] / ref["memory_units_max_rank"]
            row["time_rel_1f1b"] = row["pipeline_time_ms"] / ref["pipeline_time_ms"]
            rows.append(row)

    measured_rows, jobs = [], {}
    if not args.no_measure:
        extra = [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.seed={args.seed}", *args.extra]
        jobs = {n: fc.pipeline_overrides(n, args.pp, args.microbatches, v=v_of(n), extra=extra) for n in args.schedules}
        # the ZB orders again on moepipe's executor with lean W (I frees the graph; W keeps
        # each Linear's input and output gradient): same processes, same batches
        lean = [n for n in args.schedules if n in ZB] if not args.no_lean else []
        for n in lean:
            jobs[n + LEAN] = fc.pipeline_overrides(n, args.pp, args.microbatches, v=v_of(n),
                                                   extra=extra + ["schedule.executor=moepipe", "schedule.lean_weight_grad=true"])
        measured = fc.measure_pipeline(jobs, args.pp, rounds=args.rounds, steps=args.steps, memory=True)
        ref = measured.get("1f1b")
        for job in list(args.schedules) + [n + LEAN for n in lean]:
            x, n = measured[job], job.removesuffix(LEAN)
            peak = max(x["peak_saved_bytes_per_rank"])
            measured_rows.append({
                "schedule": n, "runtime": "moepipe lean W" if job.endswith(LEAN) else "torch",
                "pp": args.pp, "m": args.microbatches, "v": v_of(n), "bubble_measured": x["bubble_measured"],
                "replay": fc.replay_bubble(n, args.pp, v_of(n), args.microbatches, x["action_median_s"]),
                "pipeline_ms": x["makespan_s"] * 1e3, "busy_ms_per_rank": [b * 1e3 for b in x["busy_s_per_rank"]],
                "peak_saved_mib_per_rank": [b / 2**20 for b in x["peak_saved_bytes_per_rank"]],
                "peak_saved_rel_1f1b": peak / max(ref["peak_saved_bytes_per_rank"]) if ref else None,
                "pipeline_rel_1f1b": x["makespan_s"] / ref["makespan_s"] if ref else None,
                "live_after_step_mib_per_rank": [b / 2**20 for b in x["live_after_step_per_rank"]],
                "action_median_s": x["action_median_s"], "bubble_per_step": x["bubble_per_step"],
            })
    payload = {
        "figure": "zero-bubble schedules vs 1F1B: bubble and activation memory",
        "measured_pp": args.pp,
        "definitions": {
            "bubble_simulated": "moepipe.sim.simulate, 2 blocks per rank, F=I=W=1ms per block, free communication",
            "memory_units": "peak simultaneous in-flight microbatches per rank, a chunk counting 1/v (moepipe.sim engine)",
            "bubble_measured": "1 - sum_r busy_r / (pp * makespan) of schedule.step (real runs)",
            "peak_saved": "peak bytes autograd holds for backward on a rank during one step (saved_tensors_hooks)",
            "live_after_step": "saved bytes still held when schedule.step returns (released at the next step)",
        },
        "measured": measured_rows,
        "provenance": fc.provenance(args, jobs, args.seed),
        "wall_s": time.perf_counter() - t_start,
    }
    path, figs = fc.save_and_draw("fig_zero_bubble", payload, rows, args)
    print(f"{'schedule':<17} {'p':>2} {'m':>3} {'bubble sim':>10} {'formula':>8} {'time/1F1B':>9} {'mem/1F1B':>8}")
    for r in rows:
        print(f"{r['schedule']:<17} {r['pp']:>2} {r['m']:>3} {r['bubble_simulated']:>10.3f} {r['bubble_formula'] if r['bubble_formula'] is None else round(r['bubble_formula'], 3)!s:>8} "
              f"{r['time_rel_1f1b']:>9.3f} {r['memory_rel_1f1b']:>8.3f}")
    for r in measured_rows:
        print(f"measured {r['schedule']:<17} {r['runtime']:<14} pp={r['pp']} m={r['m']}: bubble {r['bubble_measured']:.3f} (replay {r['replay']:.3f}), "
              f"pipeline {r['pipeline_ms']:.0f} ms (x{r['pipeline_rel_1f1b']:.2f} of 1F1B), peak saved MiB/rank "
              f"{[round(b, 1) for b in r['peak_saved_mib_per_rank']]} (x{r['peak_saved_rel_1f1b']:.2f} of 1F1B)")
    print(f"wrote {path} and {', '.join(figs)} in {payload['wall_s']:.0f} s")
    zb = [r for r in rows if r["schedule"] == "zbv"]
    fc.headline(f"bubble_simulated_zbv_p{zb[0]['pp']}" if zb else "schedules", zb[0]["bubble_simulated"] if zb else len(rows), ".3f")


if __name__ == "__main__":
    main()
