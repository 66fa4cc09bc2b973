"""Exports of a simulated timeline: Chrome-trace JSON (Perfetto, chrome://tracing) and a Gantt PNG."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from moepipe.sim.engine import COMPUTE, EVENT_KINDS

if TYPE_CHECKING:
    from moepipe.sim.simulator import SimResult

COLORS = {"F": "#4C72B0", "B": "#DD8452", "I": "#C44E52", "W": "#55A868", "FB": "#8172B3", "send": "#937860", "recv": "#DA8BC3", "a2a": "#8C8C8C"}


def chrome_trace(res: "SimResult") -> dict:
    """One process per pipeline rank, thread 0 compute and thread 1 communication; times in us."""
    tl = res.timeline
    events: list[dict] = []
    for r in range(res.pp):
        first, last = r * res.ep, r * res.ep + res.ep - 1
        events.append({"ph": "M", "name": "process_name", "pid": r, "args": {"name": f"pp rank {r} (ep ranks {first}..{last}, x{res.dp} dp)"}})
        events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 0, "args": {"name": "compute"}})
        events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 1, "args": {"name": "communication"}})
    for r, lane, kind, s, i, a, b in tl.rows():
        if kind == "idle":
            continue
        name = f"{s}{kind}{i}" if s >= 0 else kind
        events.append(
            {"ph": "X", "name": name, "cat": kind, "pid": r, "tid": lane, "ts": a * 1e6, "dur": max(b - a, 0.0) * 1e6, "args": {"stage": s, "microbatch": i}}
        )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": res.summary() | {"peak_activation_bytes": "see summary.json"}}


def write_chrome_trace(res: "SimResult", path: str) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(res), f)


def write_gantt(res: "SimResult", path: str, max_events: int = 20000) -> None:
    """Compute lanes as horizontal bars, one row per pipeline rank; labels only when few."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tl = res.timeline
    keep = (tl.lane == COMPUTE) & (tl.kind != EVENT_KINDS.index("idle"))
    idx = np.nonzero(keep)[0][:max_events]
    scale, unit = (1e3, "ms") if res.pipeline_time_s < 10 else (1.0, "s")
    fig, ax = plt.subplots(figsize=(12, 0.45 * res.pp + 1.5))
    for k in np.unique(tl.kind[idx]):
        sel = idx[tl.kind[idx] == k]
        name = EVENT_KINDS[k]
        for r in np.unique(tl.rank[sel]):
            rs = sel[tl.rank[sel] == r]
            ax.broken_barh(list(zip(tl.start[rs] * scale, (tl.end[rs] - tl.start[rs]) * scale)), (r - 0.4, 0.8),
                           facecolors=COLORS.get(name, "#333333"), edgecolors="white", linewidth=0.3)
    if len(idx) <= 300:
        for j in idx:
            ax.text((tl.start[j] + tl.end[j]) / 2 * scale, tl.rank[j], f"{tl.stage[j]}{EVENT_KINDS[tl.kind[j]]}{tl.mb[j]}",
                    ha="center", va="center", fontsize=6, color="white")
    ax.set_ylim(res.pp - 0.5, -1.3)  # headroom above rank 0 for the legend
    ax.set_yticks(range(res.pp))
    ax.set_yticklabels([f"pp {r}" for r in range(res.pp)])
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(f"{res.schedule}: pp={res.pp} ep={res.ep} dp={res.dp}, m={res.microbatches}, "
                 f"iteration {res.iteration_time_s * scale:.3g} {unit}, bubble {res.bubble_fraction:.1%}")
    present = {EVENT_KINDS[k] for k in np.unique(tl.kind[idx])}
    ax.legend(handles=[Patch(color=COLORS[k], label=k) for k in COLORS if k in present], loc="upper right", fontsize=7, ncol=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
