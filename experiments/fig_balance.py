"""Figure 6: load balancing with an auxiliary loss vs the aux-loss-free bias (DeepSeek-V3,
Wang et al. 2024), balancedness over steps, and expert-load heatmaps.

Three short single-process runs of the tiny model (8 experts, top-2) on the stdlib corpus:
- `aux_loss`: moe=default (softmax router, Switch balancing loss 0.01);
- `aux_free`: experiment=aux_free (conf/moe/aux_free.yaml: sigmoid scores, no aux loss, a
  per-expert selection bias moved by bias_update_rate * sign(mean load - load) each step);
- `none`: moe=default with aux_loss_coef=0 (no balancing: the control).
Balancedness per MoE layer and logged step, from expert_load.jsonl (tokens routed to each
expert before capacity): max/mean load (1 = balanced, 8 = all on one expert) and the
coefficient of variation; the heatmaps show each expert's share of one layer's tokens over steps.

    .venv/bin/python experiments/fig_balance.py                  # 3 runs x 80 steps, ~2 min on CPU
    .venv/bin/python experiments/fig_balance.py --bias-rate 0.01 # a faster-moving bias for short runs
    # full variant: longer runs, e.g. --steps 2000 --extra model=small train.device=auto
    .venv/bin/python experiments/fig_balance.py --quick --out /tmp/x/fig_balance.json   # 3 runs x 2 steps, a tiny model
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
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--bias-rate", type=float, default=None, help="moe.bias_update_rate of the aux_free run (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs="*", default=[])
    ap.add_argument("--out-runs", default=os.path.join(fc.ROOT, "runs", "fig_balance"))
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_balance.json"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.seq_len, args.log_every = 2, 4, 16, 1
        args.extra = fc.QUICK_MODEL + args.extra
        args.out_runs = os.path.join(fc.out_dir_of(args), "runs_fig_balance")
    args.out = fc.check_output(args)
    t_start = time.perf_counter()
    base = ["parallel=single", "schedule.microbatches=1", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"train.seq_len={args.seq_len}", f"train.seed={args.seed}", f"train.log_every={args.log_every}",
            f"train.eval_every={args.steps}", "train.eval_batches=4", "logger.progress=none", "train.device=cpu", *args.extra]
    bias = [] if args.bias_rate is None else [f"moe.bias_update_rate={args.bias_rate:g}"]
    variants = {
        "aux_loss": ["moe=default", *base],
        "aux_free": ["experiment=aux_free", *base, *bias],
        "none": ["moe=default", "moe.aux_loss_coef=0", *base],
    }
    dirs = fc.train_runs(variants, args.out_runs)

    from analysis.loadstats import run_balance

    out, rows = {}, []
    for name, d in dirs.items():
        run = fc.read_run(d)
        b = run_balance(d)
        mom, cv = b["mean_over_layers"]["max_over_mean"], b["mean_over_layers"]["cv"]
        tail = max(1, len(mom) // 4)  # the last quarter of the logged steps
        rows.append({"variant": name, "steps": run["summary"]["steps"], "max_over_mean_first": mom[0], "max_over_mean_last_quarter": statistics.fmean(mom[-tail:]),
                     "cv_first": cv[0], "cv_last_quarter": statistics.fmean(cv[-tail:]), "final_train_loss": run["rows"][-1]["loss"],
                     "final_val_loss": run["summary"]["final_val_loss"], "run_dir": os.path.relpath(d, fc.ROOT)})
        out[name] = {"balance": b, "curve": {k: [r.get(k) for r in run["rows"]] for k in ("step", "loss", "aux_loss", "load_balance_mean")},
                     "overrides": variants[name], "moe": run["summary"]["config"]["moe"]}
    layers = list(next(iter(out.values()))["balance"]["layers"])
    payload = {
        "figure": "load balancing: aux loss vs aux-loss-free bias vs none",
        "heatmap_layer": layers[-1] if layers else None,
        "definitions": {"max_over_mean": "max expert load / mean expert load per MoE layer and logged step (expert_load.jsonl), mean over layers",
                        "cv": "std / mean of expert loads", "last_quarter": "mean over the last quarter of logged steps"},
        "variants": out,
        "provenance": fc.provenance(args, variants, args.seed),
        "wall_s": time.perf_counter() - t_start,
    }
    path, figs = fc.save_and_draw("fig_balance", payload, rows, args)
    print(f"{'variant':<9} {'max/mean first':>14} {'max/mean last':>13} {'CV first':>8} {'CV last':>8} {'train':>6} {'val':>6}")
    for r in rows:
        print(f"{r['variant']:<9} {r['max_over_mean_first']:>14.2f} {r['max_over_mean_last_quarter']:>13.2f} {r['cv_first']:>8.2f} "
              f"{r['cv_last_quarter']:>8.2f} {r['final_train_loss']:>6.3f} {r['final_val_loss']:>6.3f}")
    print(f"wrote {path} and {', '.join(figs)} in {payload['wall_s']:.0f} s")
    fc.headline("max_over_mean_last_quarter", ",".join(f"{r['variant']}:{r['max_over_mean_last_quarter']:.2f}" for r in rows))


if __name__ == "__main__":
    main()
