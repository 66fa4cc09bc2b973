"""Figure 8 (PipeDream-2BW vs 1F1B), drawn from results/fig_2bw.json only: loss against step and
against wall time (tiny model, pp=2 on CPU; the single-process reference of the delayed rule
on top of 2BW's distributed losses), and the iteration time relative to 1F1B from the formula,
the simulator and the measurement side by side.

    python -c "from analysis.figures import draw_figure; draw_figure('fig_2bw')"
"""
from __future__ import annotations

from analysis.figures import SCHEDULE_COLORS, _save, _stamp, plt

COLORS = {**SCHEDULE_COLORS, "pipedream_2bw": "#2CA02C"}
LABELS = {"1f1b": "1F1B (flush every step)", "pipedream_2bw": "PipeDream-2BW (no flush, 1-step delay)"}


def draw_2bw(res: dict, figures_dir: str) -> list[str]:
    runs = res["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for name, run in runs.items():
        steps = list(range(1, len(run["loss"]) + 1))
        axes[0].plot(steps, run["loss"], color=COLORS[name], label=LABELS.get(name, name), lw=1.2)
        axes[1].plot(run["elapsed_s"], run["loss"], color=COLORS[name], label=LABELS.get(name, name), lw=1.2)
    ref = res.get("reference_2bw_loss") or []
    if ref:
        axes[0].plot(range(1, len(ref) + 1), ref, "k.", ms=3, label="one process, delayed rule")
    for ax, xl in ((axes[0], "step"), (axes[1], "wall seconds (sum of measured step times)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("loss vs step", fontsize=9)
    axes[1].set_title("loss vs time", fontsize=9)
    rel = res["iteration_relative_to_1f1b"]
    kinds = [k for k in ("formula", "simulated", "measured") if k in rel]
    xs = range(len(kinds))
    axes[2].bar([x - 0.2 for x in xs], [1.0] * len(kinds), 0.4, color=COLORS["1f1b"], label="1F1B")
    axes[2].bar([x + 0.2 for x in xs], [rel[k] for k in kinds], 0.4, color=COLORS["pipedream_2bw"], label="2BW")
    for x, k in zip(xs, kinds):
        axes[2].text(x + 0.2, rel[k], f"{rel[k]:.2f}", ha="center", va="bottom", fontsize=7)
    axes[2].set_xticks(list(xs))
    axes[2].set_xticklabels(kinds)
    axes[2].set_ylabel("iteration time / 1F1B's")
    axes[2].set_title(f"iteration time, pp={res['pp']}, m={res['m']}", fontsize=9)
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3, axis="y")
    fig.suptitle("PipeDream-2BW vs 1F1B, tiny MoE model, pp=2 on CPU: 2BW drains no pipeline between steps and applies each "
                 "gradient one step late (W(t+1) = W(t) - lr*g(W(t-1)))", fontsize=8)
    _stamp(fig, res)
    return [_save(fig, figures_dir, "fig_2bw")]
