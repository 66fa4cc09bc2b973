"""Figure 2: peak activation memory, GPipe vs 1F1B (Narayanan et al. 2019, PipeDream-Flush),
measured on real pipeline runs.

GPipe runs every forward before any backward, so each stage holds all m microbatches' activations
at its peak; 1F1B starts backwards as soon as the pipeline is full, so stage s holds at most
p - s. Measured: the bytes autograd saves for backward (parameters and buffers excluded, each
storage once), live on each stage rank, peak over one training step
(torch.autograd.graph.saved_tensors_hooks, experiments/fig_common.py). Reported per stage in
bytes and in microbatches (peak / the bytes one microbatch saves on that stage), next to the
expectation (m or p - s) and the simulator's in-flight count.

    .venv/bin/python experiments/fig_memory.py                 # pp=2 and pp=4, m=8, tiny model (CPU, <1 min)
    .venv/bin/python experiments/fig_memory.py --full          # GPU node: pp=4 and 8, m=16, model=small, 8 layers
    .venv/bin/python experiments/fig_memory.py --quick --out /tmp/x/fig_memory.json   # test-sized: pp=2, m=2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fig_common as fc  # noqa: E402

MIB = 2.0**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4], help="pipeline depths (one process per rank; pp <= model layers)")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[], help="more config overrides")
    ap.add_argument("--full", action="store_true", help="GPU variant: pp=4,8, m=16, model=small with 8 layers, device auto")
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_memory.json"))
    args = ap.parse_args()
    if args.quick:
        args.pp, args.microbatches, args.batch_size, args.seq_len = [2], 2, 4, 16
    args.out = fc.check_output(args)
    if args.full:
        args.pp, args.microbatches, args.batch_size, args.seq_len = [4, 8], 16, 64, 1024
        args.extra = ["model=small", "model.n_layers=8", "train.device=auto", "train.num_threads=0"] + args.extra
    t_start = time.perf_counter()
    m = args.microbatches
    extra = [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.seed={args.seed}", *args.extra]
    rows, jobs_all = [], {}
    for pp in args.pp:
        jobs = {s: fc.pipeline_overrides(s, pp, m, extra=extra) for s in ("gpipe", "1f1b")}
        jobs_all[f"pp{pp}"] = jobs
        measured = fc.measure_pipeline(jobs, pp, rounds=1, steps=1, warmup=1, memory=True)
        for sched, x in measured.items():
            sim = fc.inflight_units(sched, pp, m)
            for s in range(pp):
                key = str(s)
                per_mb = x["stage_bytes_per_microbatch"][key]
                rows.append({
                    "schedule": sched, "pp": pp, "m": m, "stage": s,
                    "peak_saved_bytes": x["stage_peak_saved_bytes"][key], "peak_saved_mib": x["stage_peak_saved_bytes"][key] / MIB,
                    "bytes_per_microbatch": per_mb, "measured_inflight": x["peak_inflight_measured"][key],
                    "expected_inflight": m if sched == "gpipe" else min(m, pp - s),
                    "simulated_inflight": sim["peak_inflight_per_stage"][s],
                    "live_after_step_bytes": x["live_after_step_per_rank"][s],
                })
    payload = {
        "figure": "peak activation memory per stage, GPipe vs 1F1B (measured)",
        "definitions": {
            "peak_saved_bytes": "max over one step of the storage bytes autograd holds for backward on the stage's rank "
                                "(saved_tensors_hooks; parameters/buffers excluded; a storage counted once)",
            "bytes_per_microbatch": "all bytes the stage saved during the step / m",
            "measured_inflight": "peak_saved_bytes / bytes_per_microbatch",
            "expected_inflight": "GPipe: m; 1F1B: min(m, p - s)",
            "simulated_inflight": "moepipe.sim engine peak in-flight microbatches of the stage (uniform stages)",
        },
        "provenance": fc.provenance(args, jobs_all, args.seed),
        "wall_s": time.perf_counter() - t_start,
    }
    path, figs = fc.save_and_draw("fig_memory", payload, rows, args)
    print(f"{'schedule':<6} {'pp':>3} {'stage':>5} {'peak MiB':>9} {'MiB/mb':>7} {'in flight':>9} {'expected':>8} {'sim':>4}")
    for r in rows:
        print(f"{r['schedule']:<6} {r['pp']:>3} {r['stage']:>5} {r['peak_saved_mib']:>9.2f} {r['bytes_per_microbatch'] / MIB:>7.2f} "
              f"{r['measured_inflight']:>9.2f} {r['expected_inflight']:>8} {r['simulated_inflight']:>4}")
    worst = max(abs(r["measured_inflight"] - r["expected_inflight"]) for r in rows)
    print(f"wrote {path} and {', '.join(figs)} in {payload['wall_s']:.0f} s")
    fc.headline("max_abs_measured_minus_expected_inflight", worst, ".3f")


if __name__ == "__main__":
    main()
