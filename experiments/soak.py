"""Soak (issue 6): a long run of the tiny model with re-placement every 50 steps, watching
for leaks and hangs. The `topo` placer chases a rotating hot expert (moves every 50 steps),
so most re-plans migrate; every re-plan event records the largest worker RSS, and the run
must finish inside a deadline.

    .venv/bin/python experiments/soak.py                 # 2,000 steps, pp=2 x ep=2, ~10 min on 2 cores
    .venv/bin/python experiments/soak.py --steps 400
    .venv/bin/python experiments/soak.py --quick --out /tmp/x.json   # 4 steps, pp=2 (2 ranks), a tiny model

Growth = RSS at the last re-plan / RSS at the second re-plan - 1 (the first one still
includes one-off allocations of the first migration). Writes results/soak.json; prints
`rss_growth=` last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import fig_common as fc  # noqa: E402
from moepipe.train.metrics import write_json  # noqa: E402

QUICK = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "moe.expert_hidden=32",
         "train.batch_size=4", "train.seq_len=16", "train.log_every=1", "train.eval_every=4", "train.ckpt_every=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--interval", type=int, default=50)
    ap.add_argument("--deadline-s", type=float, default=3600)
    ap.add_argument("--parallel", default="pp2_ep2", help="conf/parallel preset")
    fc.add_output_args(ap, os.path.join(ROOT, "results", "soak.json"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.interval, args.parallel, args.deadline_s = 4, 1, "pp2", 300
    args.out = fc.check_output(args)
    overrides = [
        f"parallel={args.parallel}", "placer=topo", f"placer.interval={args.interval}", "placer.replica_slots=1",
        "workload.kind=rotating", "workload.strength=8.0", f"workload.period={args.interval}",
        f"train.steps={args.steps}", "train.batch_size=8", "train.seq_len=64", "schedule.microbatches=2",
        "train.eval_every=500", "train.eval_batches=2", "train.log_every=50", "train.ckpt_every=500",
        "logger.progress=none", "train.num_threads=1", *(QUICK if args.quick else []),
    ]
    prov = fc.provenance(args, overrides, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "moepipe.train", *overrides, f"hydra.run.dir={tmp}"],
                              capture_output=True, text=True, timeout=args.deadline_s)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"soak run failed with status {proc.returncode}:\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))]
        summary = json.load(open(os.path.join(tmp, "summary.json")))
    replans = [r for r in rows if r.get("event") == "replan"]
    rss = [(r["step"], r["max_rank_rss_mb"]) for r in replans]
    growth = rss[-1][1] / rss[1][1] - 1 if len(rss) > 2 else float("nan")
    quarter = next((mb for st, mb in rss if st >= args.steps // 4), rss[-1][1])
    late_growth = rss[-1][1] / quarter - 1  # after allocator warm-up: the leak signal
    result = {
        "rss_growth": growth, "rss_growth_after_first_quarter": late_growth, "steps": summary["steps"], "wall_s": wall, "replans": len(replans),
        "migrations": sum(bool(r.get("migrate")) for r in replans),
        "bytes_moved": sum(r.get("bytes_moved", 0) for r in replans), "rss_mb_by_replan": rss,
        "final_train_loss": summary["final_train_loss"], "final_val_loss": summary["final_val_loss"],
        "overrides": overrides, "command": " ".join([sys.executable, "-m", "moepipe.train", *overrides]), "provenance": prov,
    }
    write_json(args.out, result)
    print(f"{summary['steps']} steps in {wall:.0f} s, {result['replans']} re-plans, {result['migrations']} migrations, "
          f"RSS {rss[1][1]:.0f} -> {rss[-1][1]:.0f} MB ({late_growth:+.2%} after step {args.steps // 4})")
    print(f"rss_growth={growth:.4f}")


if __name__ == "__main__":
    main()
