"""Figure 9 (Chimera vs 1F1B), drawn from results/fig_chimera.json only: bubble fraction against
microbatches per pipeline size (formula lines, simulated points with B = F and B = 2F, measured
and replayed CPU points), and throughput relative to 1F1B at the measured pipeline size
(formula, simulated, measured side by side).

    python -c "from analysis.figures import draw_figure; draw_figure('fig_chimera')"
"""
from __future__ import annotations

from analysis.figures import SCHEDULE_COLORS, _save, _stamp, plt

COLORS = {"1f1b": SCHEDULE_COLORS["1f1b"], "chimera": "#17BECF"}
LABELS = {"1f1b": "1F1B", "chimera": "Chimera"}


def draw_chimera(res: dict, figures_dir: str) -> list[str]:
    rows = res["rows"]
    sizes = sorted({r["pp"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(4.2 * (len(sizes) + 1), 4))
    for ax, p in zip(axes, sizes):
        for s in ("1f1b", "chimera"):
            pts = sorted((r["m"], r) for r in rows if r["pp"] == p and r["schedule"] == s)
            ms = [m for m, _ in pts]
            ax.plot(ms, [r["formula"] for _, r in pts], "-", color=COLORS[s], label=f"{LABELS[s]} formula")
            ax.plot(ms, [r["simulated"] for _, r in pts], "o", color=COLORS[s], mfc="none", label=f"{LABELS[s]} simulated, B = F")
            ax.plot(ms, [r["simulated_b2f"] for _, r in pts], "x", color=COLORS[s], label=f"{LABELS[s]} simulated, B = 2F")
            meas = [(m, r["measured"]) for m, r in pts if r.get("measured") is not None]
            if meas:
                ax.plot(*zip(*meas), "s", color=COLORS[s], label=f"{LABELS[s]} measured (CPU)")
                ax.plot(*zip(*[(m, r["replay"]) for m, r in pts if r.get("replay") is not None]), "^", color=COLORS[s], ms=4,
                        label=f"{LABELS[s]} replay of measured actions")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("microbatches m")
        ax.set_ylabel("bubble fraction")
        ax.set_title(f"p = {p}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5)
    ax = axes[-1]
    thr = res["throughput_relative_to_1f1b"]
    kinds = ("formula", "simulated", "measured")
    width = 0.8 / max(1, len(thr))
    for j, (m, t) in enumerate(sorted(thr.items(), key=lambda kv: int(kv[0]))):
        xs = [i + (j - (len(thr) - 1) / 2) * width for i in range(len(kinds))]
        ax.bar(xs, [t[k] for k in kinds], width, label=f"m = {m}")
        for x, k in zip(xs, kinds):
            ax.text(x, t[k], f"{t[k]:.2f}", ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color=COLORS["1f1b"], lw=1, ls="--", label="1F1B")
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds)
    ax.set_ylabel("throughput / 1F1B's")
    ax.set_title(f"throughput, p = {res['measured_pp']} (schedule.step only)", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Chimera vs 1F1B: two model replicas in opposite directions (tiny MoE model on CPU for the measured points)", fontsize=8)
    _stamp(fig, res)
    return [_save(fig, figures_dir, "fig_chimera")]
