"""Figure: predicted throughput of every (tp, pp, ep, dp) mesh the search considers, the chosen
one marked (results/fig_tp_mesh.json from experiments/fig_tp_mesh.py), and each mesh's peak
memory per GPU against the GPU's capacity.

    python -c "from analysis.figures import draw_figure; draw_figure('fig_tp_mesh')"
"""
from __future__ import annotations

from matplotlib.patches import Patch

from analysis.figures import _save, _stamp, plt

TP_COLORS = {1: "#4C72B0", 2: "#DD8452", 4: "#55A868", 8: "#C44E52"}


def draw_tp_mesh(res: dict, figures_dir: str) -> list[str]:
    rows = sorted(res["rows"], key=lambda r: (r["tp"], r["pp"], r["ep"]))
    x = list(range(len(rows)))
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.16 * len(rows) + 3), 7.5), sharex=True)
    ax, mx = axes
    for i, r in zip(x, rows):
        color = TP_COLORS.get(r["tp"], "gray")
        if r["feasible"]:
            ax.bar(i, r["tokens_per_s"], color=color, edgecolor="black" if r["chosen"] else color, lw=1.5 if r["chosen"] else 0.3)
        else:
            ax.plot(i, 0, marker="x" if r["kind"] == "memory" else ".", color=color, ms=5)
        if r.get("peak_memory_bytes") is not None:
            mx.bar(i, r["peak_memory_bytes"] / 1e9, color=color, alpha=1.0 if r["feasible"] else 0.35)
    chosen = next((i for i, r in zip(x, rows) if r["chosen"]), None)
    if chosen is not None:
        r = rows[chosen]
        ax.annotate(f"chosen: {r['label']}\n{r['tokens_per_s']:.3g} tokens/s", (chosen, r["tokens_per_s"]),
                    xytext=(0, 14), textcoords="offset points", ha="center", fontsize=8, arrowprops={"arrowstyle": "->"})
        ax.set_ylim(0, r["tokens_per_s"] * 1.3)
    ax.set_ylabel("predicted tokens/s")
    m = f"m={res['microbatches']}" if res.get("microbatch_seqs") is None else f"{res['microbatch_seqs']} seq/microbatch"
    ax.set_title(f"{res['model']} on {res['topology']} ({res['gpus']} GPUs), {res['schedule']} {m}, "
                 f"batch {res['batch_size']}x{res['seq_len']}: {res['n_feasible']} of {res['n_considered']} meshes fit "
                 "(x: over memory, dot: invalid job)", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=f"tp={tp}") for tp, c in TP_COLORS.items()], fontsize=7, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    mx.axhline(res["memory_capacity_gb"], color="k", lw=0.8, ls="--", label=f"{res['memory_capacity_gb']:.0f} GB per GPU")
    mx.set_yscale("log")
    mx.set_ylabel("peak memory per GPU (GB)")
    mx.legend(fontsize=7)
    mx.grid(axis="y", alpha=0.3)
    mx.set_xticks(x, [f"{r['tp']}/{r['pp']}/{r['ep']}/{r['dp']}" for r in rows], rotation=90, fontsize=6)
    mx.set_xlabel("mesh tp/pp/ep/dp")
    _stamp(fig, res)
    return [_save(fig, figures_dir, "fig_tp_mesh")]
