"""Training curves of one or more runs, from their results files (metrics.jsonl), never W&B.

    python analysis/plot_run.py runs/default/<stamp> [more run dirs] --out figures/run.png

Draws train/validation loss, load balancedness (max/mean expert demand) and the dropped-token
fraction against steps.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: pass a run directory written by moepipe-train")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(run_dirs: list[str], out: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for run in run_dirs:
        rows = read_metrics(run)
        label = os.path.basename(os.path.normpath(run))
        logged = [r for r in rows if r.get("loss") is not None]
        axes[0].plot([r["step"] for r in logged], [r["loss"] for r in logged], label=f"{label} train")
        val = [r for r in rows if r.get("val_loss") is not None]
        axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", label=f"{label} val")
        axes[1].plot([r["step"] for r in logged], [r.get("load_balance_mean", 1.0) for r in logged], label=f"{label} mean")
        axes[1].plot([r["step"] for r in logged], [r.get("load_balance_max", 1.0) for r in logged], ":", label=f"{label} max")
        axes[2].plot([r["step"] for r in logged], [r.get("dropped_frac", 0.0) for r in logged], label=label)
    for ax, title in zip(axes, ("loss (nats/token)", "expert load max/mean (1 = balanced)", "dropped-token fraction")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    print(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", default="figures/run.png")
    args = ap.parse_args()
    plot_runs(args.runs, args.out)


if __name__ == "__main__":
    main()
