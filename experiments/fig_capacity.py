"""Figure 5: capacity factor vs dropped tokens and loss (Switch Transformer, Fedus et al. 2021).

Top-1 Switch routing (conf/moe/switch.yaml: softmax, aux loss 0.01, z-loss 0.001, drops by
position) on the stdlib byte corpus, tiny model, one process; one short run per capacity
factor (0 = dropless). An expert takes at most cf * tokens / E assignments per microbatch; the
rest are dropped (the token skips the expert, its residual passes through). Reported per run:
dropped fraction (metrics.jsonl `dropped_frac`, per logged step; mean over the run and at the
end), final train loss (mean of the last log window) and validation loss (summary.json).

    .venv/bin/python experiments/fig_capacity.py                         # 5 runs x 60 steps, ~2 min on CPU
    # full variant (GPU or longer CPU runs): a Hydra sweep, then collect its run dirs
    moepipe-train -m experiment=switch_capacity parallel=single moe.capacity_factor=0,0.5,1.0,1.25,2.0
    .venv/bin/python experiments/fig_capacity.py --runs runs/multirun/switch_capacity/<stamp>/*
    .venv/bin/python experiments/fig_capacity.py --quick --out /tmp/x/fig_capacity.json   # 2 factors x 2 steps, a tiny model
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
    ap.add_argument("--capacity-factors", type=float, nargs="+", default=[0.5, 1.0, 1.25, 2.0, 0.0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--out-runs", default=os.path.join(fc.ROOT, "runs", "fig_capacity"))
    ap.add_argument("--runs", nargs="*", help="collect existing run dirs (e.g. a moepipe-train -m sweep) instead of training")
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_capacity.json"))
    args = ap.parse_args()
    if args.quick:
        args.capacity_factors, args.steps, args.batch_size, args.seq_len = [1.0, 0.0], 2, 4, 16
        args.extra = fc.QUICK_MODEL + args.extra
        args.out_runs = os.path.join(fc.out_dir_of(args), "runs_fig_capacity")
    args.out = fc.check_output(args)
    t_start = time.perf_counter()
    variants = {}
    if args.runs:
        dirs = {os.path.basename(os.path.normpath(d)): d for d in args.runs}
    else:
        base = ["experiment=switch_capacity", "parallel=single", "schedule.microbatches=1", f"train.steps={args.steps}",
                f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.seed={args.seed}", f"train.log_every={min(5, args.steps)}",
                f"train.eval_every={args.steps}", "train.eval_batches=4", "logger.progress=none", "train.device=cpu", *args.extra]
        variants = {f"cf{cf:g}": base + [f"moe.capacity_factor={cf:g}"] for cf in args.capacity_factors}
        dirs = fc.train_runs(variants, args.out_runs)
    rows = []
    for name, d in dirs.items():
        run = fc.read_run(d)
        logged, s = run["rows"], run["summary"]
        rows.append({
            "run": name, "capacity_factor": s["config"]["moe"]["capacity_factor"], "steps": s["steps"],
            "dropped_frac_mean": statistics.fmean(r.get("dropped_frac", 0.0) for r in logged),
            "dropped_frac_final": logged[-1].get("dropped_frac", 0.0), "final_train_loss": logged[-1]["loss"],
            "final_val_loss": s["final_val_loss"], "load_balance_mean_final": logged[-1].get("load_balance_mean"),
            "tokens_per_s": s["tokens_per_s"], "run_dir": os.path.relpath(d, fc.ROOT),
            "curve": {k: [r.get(k) for r in logged] for k in ("step", "loss", "dropped_frac", "load_balance_mean")},
        })
    rows.sort(key=lambda r: (r["capacity_factor"] <= 0, r["capacity_factor"]))
    steps = rows[0]["steps"] if rows else 0
    payload = {
        "figure": "capacity factor vs dropped tokens and loss (Switch, top-1)",
        "summary_line": f"tiny model, stdlib bytes, {steps} steps per run",
        "definitions": {"dropped_frac": "assignments beyond an expert's capacity / all assignments (metrics.jsonl)",
                        "final_train_loss": "mean train loss of the last log window", "final_val_loss": "summary.json final_val_loss"},
        "provenance": fc.provenance(args, variants or {"runs": args.runs}, args.seed),
        "wall_s": time.perf_counter() - t_start,
    }
    path, figs = fc.save_and_draw("fig_capacity", payload, rows, args)
    print(f"{'cf':>8} {'dropped mean':>12} {'dropped end':>11} {'train':>7} {'val':>7}")
    for r in rows:
        cf = "dropless" if r["capacity_factor"] <= 0 else f"{r['capacity_factor']:g}"
        print(f"{cf:>8} {r['dropped_frac_mean']:>12.3f} {r['dropped_frac_final']:>11.3f} {r['final_train_loss']:>7.3f} {r['final_val_loss']:>7.3f}")
    print(f"wrote {path} and {', '.join(figs)} in {payload['wall_s']:.0f} s")
    fc.headline("dropped_frac_mean_by_cf", ",".join(f"{r['capacity_factor']:g}:{r['dropped_frac_mean']:.3f}" for r in rows))


if __name__ == "__main__":
    main()
