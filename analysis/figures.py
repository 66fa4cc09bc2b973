"""Figures of the paper reproductions, drawn from results files only (results/fig_*.json,
results/bench_sim.json), never from W&B. One drawer per results file; `draw_figure(name)`
draws every figure of one results file, `draw_all()` every one whose results exist.

    python analysis/make_figures.py            # redraw all figures from results/
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# Same palette as the simulator's own Gantt export (moepipe/sim/trace.py), plus the loss.
COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868", "FB": "#8172B3", "loss": "#937860"}
SCHEDULE_COLORS = {"gpipe": "#4C72B0", "1f1b": "#DD8452", "interleaved_1f1b": "#55A868", "interleaved_zb": "#C44E52",
                   "zbv": "#8172B3", "dualpipev": "#937860"}


def read_results(name: str, results_dir: str) -> dict | None:
    path = os.path.join(results_dir, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _save(fig, figures_dir: str, name: str) -> str:
    os.makedirs(figures_dir, exist_ok=True)
    path = os.path.join(figures_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _stamp(fig, res: dict) -> None:
    """Provenance in the corner: commit and whether timings came from a shared CPU."""
    info = res.get("provenance", {})
    commit = (info.get("git_commit") or "unknown")[:12]
    fig.text(0.995, 0.005, f"commit {commit}", ha="right", va="bottom", fontsize=6, color="gray")


# ---------------------------------------------------------------------------- Gantt


def gantt(ax, rows: list[list], n_ranks: int, title: str, unit_scale: float = 1e3, unit: str = "ms", label_max: int = 120) -> None:
    """rows: [rank, kind, stage, mb, start_s, end_s] compute events; one lane per pipeline rank."""
    for kind in COLORS:
        for r in range(n_ranks):
            bars = [(a * unit_scale, (b - a) * unit_scale) for rr, k, _s, _i, a, b in rows if rr == r and k == kind]
            if bars:
                ax.broken_barh(bars, (r - 0.4, 0.8), facecolors=COLORS[kind], edgecolors="white", linewidth=0.3)
    if len(rows) <= label_max:
        for rr, k, s, i, a, b in rows:
            if k != "loss":
                ax.text((a + b) / 2 * unit_scale, rr, f"{s}{k}{i}", ha="center", va="center", fontsize=5, color="white")
    ax.set_ylim(n_ranks - 0.5, -0.5)
    ax.set_yticks(range(n_ranks))
    ax.set_yticklabels([f"pp {r}" for r in range(n_ranks)])
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title, fontsize=9)


def _gantt_legend(fig, kinds: set[str]) -> None:
    fig.legend(handles=[Patch(color=COLORS[k], label=k) for k in COLORS if k in kinds], loc="upper right", ncol=6, fontsize=7)


# ---------------------------------------------------------------------------- 1. bubble vs microbatches


def draw_bubble(res: dict, figures_dir: str) -> list[str]:
    rows = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]  # formula and simulation, every simulated pipeline depth
    for pp in sorted({r["pp"] for r in rows}):
        sel = sorted((r for r in rows if r["pp"] == pp and r["schedule"] == "gpipe"), key=lambda r: r["m"])
        line, = ax.plot([r["m"] for r in sel], [r["formula"] for r in sel], "-", lw=1, label=f"p={pp}: (p-1)/(m+p-1)")
        for sched, marker in (("gpipe", "s"), ("1f1b", "o")):
            s = sorted((r for r in rows if r["pp"] == pp and r["schedule"] == sched), key=lambda r: r["m"])
            ax.plot([r["m"] for r in s], [r["simulated"] for r in s], marker, mfc="none", ms=8 if marker == "s" else 5,
                    color=line.get_color(), label=f"p={pp} {sched} simulated")
    ax.set_title("simulated (moepipe.sim, uniform stages, free communication) vs formula", fontsize=9)
    ax = axes[1]  # real runs
    pp = res["measured_pp"]
    sel = [r for r in rows if r["pp"] == pp and r.get("measured") is not None]
    ms = sorted({r["m"] for r in sel})
    ax.plot(ms, [next(r["formula"] for r in sel if r["m"] == m) for m in ms], "k-", lw=1, label="(p-1)/(m+p-1)")
    for sched in ("gpipe", "1f1b"):
        s = sorted((r for r in sel if r["schedule"] == sched), key=lambda r: r["m"])
        c = SCHEDULE_COLORS[sched]
        if s:
            ax.plot([r["m"] for r in s], [r["measured"] for r in s], "o-", color=c, label=f"{sched} measured")
            ax.plot([r["m"] for r in s], [r["replay"] for r in s], "x--", color=c, alpha=0.7, label=f"{sched} replay (measured actions)")
    ax.set_title(f"real CPU runs: tiny model, pp={pp}, 1 thread per rank (shared, noisy cores)", fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("microbatches m")
        ax.set_ylabel("bubble fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    _stamp(fig, res)
    out = [_save(fig, figures_dir, "fig_bubble")]

    g = res.get("gantt", {})
    if g:
        fig, axes = plt.subplots(len(g), 1, figsize=(12, 1.3 * sum(v["pp"] for v in g.values()) + 0.8 * len(g)), squeeze=False)
        kinds = set()
        for ax, (title, v) in zip(axes[:, 0], g.items()):
            gantt(ax, v["rows"], v["pp"], title)
            kinds |= {r[1] for r in v["rows"]}
        _gantt_legend(fig, kinds)
        _stamp(fig, res)
        out.append(_save(fig, figures_dir, "fig_gantt"))
    return out


# ---------------------------------------------------------------------------- 2. activation memory


def draw_memory(res: dict, figures_dir: str) -> list[str]:
    rows = res["rows"]
    runs = sorted({(r["pp"], r["m"]) for r in rows})
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (pp, m) in zip(axes[0], runs):
        sel = [r for r in rows if r["pp"] == pp and r["m"] == m]
        stages = sorted({r["stage"] for r in sel})
        width = 0.38
        for j, sched in enumerate(("gpipe", "1f1b")):
            s = {r["stage"]: r for r in sel if r["schedule"] == sched}
            x = np.arange(len(stages)) + (j - 0.5) * width
            ax.bar(x, [s[st]["measured_inflight"] for st in stages], width, color=SCHEDULE_COLORS[sched], label=f"{sched} measured")
            ax.plot(x, [s[st]["expected_inflight"] for st in stages], "k_", ms=18, mew=2)
            for xi, st in zip(x, stages):
                ax.text(xi, s[st]["measured_inflight"] + 0.1, f"{s[st]['peak_saved_mib']:.1f} MiB", ha="center", fontsize=6, rotation=90, va="bottom")
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels([f"stage {s}" for s in stages])
        ax.set_ylim(0, m * 1.3)  # room for the MiB labels
        ax.set_ylabel("peak saved activations (microbatches)")
        ax.set_title(f"pp={pp}, m={m}: bars measured, black ticks m (GPipe) / p-s (1F1B)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper right")
    _stamp(fig, res)
    return [_save(fig, figures_dir, "fig_memory")]


# ---------------------------------------------------------------------------- 3. interleaved 1F1B


def draw_interleaved(res: dict, figures_dir: str) -> list[str]:
    rows = res["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for (p, m) in sorted({(r["pp"], r["m"]) for r in rows}):
        s = sorted((r for r in rows if r["pp"] == p and r["m"] == m), key=lambda r: r["v"])
        line, = ax.plot([r["v"] for r in s], [r["ratio_formula"] for r in s], "-", lw=1, label=f"p={p} m={m}: (p-1)/(vm)")
        ax.plot([r["v"] for r in s], [r["ratio_simulated"] for r in s], "s", mfc="none", ms=8, color=line.get_color(), label="simulated")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("virtual stages per rank v")
    ax.set_ylabel("bubble time / ideal compute time")
    ax.set_title("interleaved 1F1B, uniform stages, free communication", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    meas = res.get("measured", [])
    if meas:
        vs = [r["v"] for r in meas]
        ax.plot(vs, [r["formula"] for r in meas], "k-", lw=1, label="formula ((p-1)/v)/(m+(p-1)/v)")
        ax.plot(vs, [r["measured"] for r in meas], "o-", color=SCHEDULE_COLORS["interleaved_1f1b"], label="measured")
        ax.plot(vs, [r["replay"] for r in meas], "x--", color=SCHEDULE_COLORS["interleaved_1f1b"], label="replay (measured actions)")
        ax2 = ax.twinx()
        ax2.plot(vs, [r["makespan_s"] * 1e3 for r in meas], "^:", color="gray", label="pipeline time (ms)")
        ax2.set_ylabel("measured pipeline time (ms)", color="gray")
        p, m = meas[0]["pp"], meas[0]["m"]
        ax.set_title(f"real CPU runs: pp={p}, m={m}, {res.get('measured_layers')} blocks", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(vs)
        ax.set_xticklabels([str(v) for v in vs])
        ax.set_xlabel("virtual stages per rank v")
        ax.set_ylabel("bubble fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
        ax2.legend(fontsize=6, loc="upper right")
    else:
        ax.set_axis_off()
    _stamp(fig, res)
    return [_save(fig, figures_dir, "fig_interleaved")]


# ---------------------------------------------------------------------------- 4. zero bubble


def draw_zero_bubble(res: dict, figures_dir: str) -> list[str]:
    sim, meas = res["rows"], {r["schedule"]: r for r in res.get("measured", [])}
    names = list(dict.fromkeys(r["schedule"] for r in sim))
    pps = sorted({r["pp"] for r in sim}, reverse=True)
    series = [(f"simulated p={p}", {r["schedule"]: r for r in sim if r["pp"] == p}, None) for p in pps]
    series.append((f"measured p={res.get('measured_pp')} (CPU)", meas, "//"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(names))
    w = 0.8 / len(series)
    for ax, keys, title in ((axes[0], ("bubble_simulated", "bubble_measured"), "bubble fraction"),
                            (axes[1], ("memory_rel_1f1b", "peak_saved_rel_1f1b"), "peak activations of the fullest rank / 1F1B's")):
        for j, (label, by, hatch) in enumerate(series):
            vals = [next((by[n][k] for k in keys if n in by and by[n].get(k) is not None), 0.0) for n in names]
            ax.bar(x + (j - (len(series) - 1) / 2) * w, vals, w, color=[SCHEDULE_COLORS[n] for n in names], alpha=1.0 - 0.3 * j,
                   hatch=hatch, edgecolor="black" if hatch else None, linewidth=0.5, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=15, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("bubble fraction")
    axes[1].set_ylabel("relative to 1F1B")
    fig.suptitle(f"zero-bubble vs 1F1B: simulated with 2 blocks per rank, F=I=W, m={sim[0]['m']}; measured tiny model on CPU", fontsize=9)
    _stamp(fig, res)
    return [_save(fig, figures_dir, "fig_zero_bubble")]


# ---------------------------------------------------------------------------- 5. capacity factor


def draw_capacity(res: dict, figures_dir: str) -> list[str]:
    rows = sorted(res["rows"], key=lambda r: (r["capacity_factor"] <= 0, r["capacity_factor"]))
    labels = [("dropless" if r["capacity_factor"] <= 0 else f"{r['capacity_factor']:g}") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = np.arange(len(rows))
    axes[0].bar(x, [100 * r["dropped_frac_mean"] for r in rows], color="#C44E52")
    axes[0].set_ylabel("dropped assignments (%) , mean over the run")
    axes[1].plot(x, [r["final_train_loss"] for r in rows], "o-", label="train (last log window)")
    axes[1].plot(x, [r["final_val_loss"] for r in rows], "s--", label="validation")
    axes[1].set_ylabel("loss (nats/token)")
    axes[1].legend(fontsize=7)
    for ax in axes[:2]:
        ax.set_xticks(x)
        ax.set_xticklabels(labels)
        ax.set_xlabel("capacity factor")
        ax.grid(alpha=0.3)
    for r, lab in zip(rows, labels):
        axes[2].plot(r["curve"]["step"], r["curve"]["dropped_frac"], label=f"cf {lab}")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("dropped fraction")
    axes[2].legend(fontsize=7)
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"Switch routing (top-1), {res.get('summary_line', '')}", fontsize=9)
    _stamp(fig, res)
    return [_save(fig, figures_dir, "fig_capacity")]


# ---------------------------------------------------------------------------- 6. load balancing


def draw_balance(res: dict, figures_dir: str) -> list[str]:
    variants = res["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, v in variants.items():
        b = v["balance"]
        axes[0].plot(b["steps"], b["mean_over_layers"]["max_over_mean"], label=name)
        axes[1].plot(b["steps"], b["mean_over_layers"]["cv"], label=name)
        c = v["curve"]
        axes[2].plot(c["step"], c["loss"], label=name)
    for ax, t in zip(axes, ("expert load max/mean (mean over layers)", "coefficient of variation of load", "train loss")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _stamp(fig, res)
    out = [_save(fig, figures_dir, "fig_balance")]

    # Heatmap: share of tokens per expert over steps, one panel per variant (one layer).
    layer = res.get("heatmap_layer")
    fig, axes = plt.subplots(1, len(variants), figsize=(4.6 * len(variants), 3.8), squeeze=False)
    for ax, (name, v) in zip(axes[0], variants.items()):
        loads = np.asarray(v["balance"]["layers"][layer]["loads"], dtype=float)
        share = loads / np.maximum(loads.sum(1, keepdims=True), 1)
        steps = v["balance"]["steps"]
        im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=max(0.25, float(share.max())),
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, share.shape[1] - 0.5), interpolation="nearest")
        ax.set_title(f"{name}: layer {layer}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of tokens")
    _stamp(fig, res)
    out.append(_save(fig, figures_dir, "fig_load_heatmap"))
    return out


# ---------------------------------------------------------------------------- simulated vs measured


def draw_sim_vs_measured(results_dir: str, figures_dir: str) -> list[str]:
    """Scatter of simulated against measured: iteration times (bench_sim.json) and bubbles (fig_*)."""
    bench = read_results("bench_sim", results_dir)
    pts = []  # (label, measured, simulated, panel)
    if bench:
        for name, r in bench["rows"].items():
            pts.append((name, r["measured_s"] * 1e3, r["predicted_s"] * 1e3, "time"))
    for fname in ("fig_bubble", "fig_zero_bubble"):
        res = read_results(fname, results_dir)
        if not res:
            continue
        for r in res.get("rows", []) + res.get("measured", []):
            meas = r.get("measured", r.get("bubble_measured"))
            if isinstance(meas, (int, float)) and r.get("replay") is not None:
                pts.append((f"{r['schedule']} m={r.get('m')}", meas, r["replay"], "bubble"))
    if not pts:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, panel, unit in zip(axes, ("time", "bubble"), ("iteration time (ms)", "bubble fraction")):
        sel = [p for p in pts if p[3] == panel]
        if not sel:
            ax.set_axis_off()
            continue
        lo = min(min(p[1], p[2]) for p in sel) * 0.9
        hi = max(max(p[1], p[2]) for p in sel) * 1.1
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        for label, mv, sv, _ in sel:
            ax.plot(mv, sv, "o", color=SCHEDULE_COLORS.get(label.split()[0], "gray"))
            ax.annotate(label, (mv, sv), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"measured {unit}")
        ax.set_ylabel(f"simulated {unit}")
        ax.grid(alpha=0.3)
    axes[0].set_title("bench_sim.json: simulate() from a profile vs real pp=2 runs", fontsize=9)
    axes[1].set_title("bubble: engine replay of measured actions vs measured", fontsize=9)
    return [_save(fig, figures_dir, "fig_sim_vs_measured")]


# ---------------------------------------------------------------------------- 7. dynamic placement


PLACER_COLORS = {"static": "tab:gray", "eplb": "tab:orange", "topo": "tab:blue", "balance_by_time": "tab:green"}


def draw_placement(res: dict, figures_dir: str) -> list[str]:
    """Measured step throughput over the run with re-plan markers (skew, slow device), the
    measured wall-time speedups, and the simulated speedups over cluster sizes."""
    meas, sim = res.get("measured", []), res.get("simulated", [])
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for ax, scen in zip(axes[:2], ("skew", "slow")):
        for r in (x for x in meas if x["scenario"] == scen):
            c = r["curve"]
            color = PLACER_COLORS.get(r["placer"], "black")
            ax.plot([p["step"] for p in c], [p["tokens_per_s"] for p in c], label=r["placer"], color=color)
            for e in r["events"]:
                if e["migrate"]:
                    ax.axvline(e["step"], color=color, lw=0.8, ls=":")
                    if e.get("stage_layers") and scen == "slow":
                        split = "|".join(str(b - a) for a, b in e["stage_layers"])
                        ax.annotate(f"blocks {split}", (e["step"], ax.get_ylim()[0]), fontsize=6, rotation=90, color=color)
        ax.set_title(f"measured ({scen}): tokens/s per logged window; dotted = migration", fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    scens = sorted({r["scenario"] for r in meas})
    width = 0.8 / max(1, len({r["placer"] for r in meas}))
    for i, placer in enumerate(dict.fromkeys(r["placer"] for r in meas)):
        vals = [next((r["speedup_vs_static"] for r in meas if r["scenario"] == s and r["placer"] == placer), 0) for s in scens]
        axes[2].bar([j + i * width for j in range(len(scens))], vals, width, label=placer, color=PLACER_COLORS.get(placer))
    axes[2].set_xticks([j + width for j in range(len(scens))], scens)
    axes[2].axhline(1.0, color="k", lw=0.8)
    axes[2].set_title("measured wall-time speedup over static (placer + migration included)", fontsize=8)
    axes[2].legend(fontsize=7)
    for hetero, ls in ((False, "-"), (True, "--")):
        for placer in dict.fromkeys(r["placer"] for r in sim):
            pts = sorted((r["devices"], r["speedup_vs_static"]) for r in sim if r["hetero"] == hetero and r["placer"] == placer)
            if pts:
                axes[3].plot(*zip(*pts), ls, marker="o", color=PLACER_COLORS.get(placer),
                             label=f"{placer} ({'A100+H100' if hetero else 'H100'})")
    axes[3].set_xscale("log", base=2)
    axes[3].set_xlabel("GPUs")
    axes[3].set_title("simulated speedup over static, log-normal expert skew", fontsize=8)
    axes[3].grid(alpha=0.3)
    axes[3].legend(fontsize=6)
    _stamp(fig, res)
    return [_save(fig, figures_dir, "fig_placement")]


DRAWERS = {
    "fig_bubble": draw_bubble,
    "fig_memory": draw_memory,
    "fig_interleaved": draw_interleaved,
    "fig_zero_bubble": draw_zero_bubble,
    "fig_capacity": draw_capacity,
    "fig_balance": draw_balance,
    "fig_placement": draw_placement,
    "fig_2bw": lambda res, d: _late("analysis.fig_2bw", "draw_2bw")(res, d),
    "fig_tp_mesh": lambda res, d: _late("analysis.fig_tp_mesh", "draw_tp_mesh")(res, d),
    "fig_chimera": lambda res, d: _late("analysis.fig_chimera", "draw_chimera")(res, d),
}


def _late(module: str, name: str):
    """A drawer from a module that imports this one (so it is imported at draw time)."""
    import importlib

    return getattr(importlib.import_module(module), name)


def draw_figure(name: str, results_dir: str = "results", figures_dir: str = "figures") -> list[str]:
    res = read_results(name, results_dir)
    if res is None:
        raise FileNotFoundError(f"{os.path.join(results_dir, name + '.json')} does not exist: run experiments/{name}.py first")
    return DRAWERS[name](res, figures_dir)


def draw_all(results_dir: str = "results", figures_dir: str = "figures") -> list[str]:
    out = []
    for name in DRAWERS:
        if read_results(name, results_dir) is not None:
            out += draw_figure(name, results_dir, figures_dir)
    out += draw_sim_vs_measured(results_dir, figures_dir)
    return out
