"""Forecast error of the load forecasters, offline (issue 15, item 1): plan on the past, judge on
the future, on recorded and synthetic expert-load traces.

Protocol, per trace (tokens per expert per step of one MoE layer) and re-plan interval h: at
every plan point s = window, window + h, ... each forecaster sees the steps before s (the
newest `--window` of them; ema its running average over all of them, as the runtime keeps it)
and forecasts the mean load of steps [s, s + h); the realised load is the observed mean over
those steps. Scored per plan point, then averaged over a trace's plan points:
  tv              total variation between forecast and realised shares of the load, in [0, 1]
  imbalance_err   |forecast max/mean - realised max/mean| / realised max/mean: the max/mean
                  load ratio is what sets a step's expert time
  packed_regret   experts packed on the forecast (greedy largest-first onto `--ep` ranks of
                  ceil(E/ep) slots), realised max/mean rank load over that of the same packing
                  of the realised load, minus 1: what the forecast's error costs a placer
Traces:
  workloads.py    the built-in synthetic workloads (p per step from
                  moepipe.placement.workloads), token counts drawn multinomially
  drift_*         per-expert logits moving linearly (drift_linear) or as a random walk (drift_walk)
  moving_f<frac>_p<P>  a hot block of ceil(E/ep) experts (one rank's share) that moves by frac
                  of its width every P steps (circularly)
  jumping_p<P>    the same block jumping to a random offset every P steps
  run:<file>:<layer>  --traces: expert_load.jsonl files of moepipe-train runs (one record per
                  logged step: the step's tokens per expert per layer); logged every k steps,
                  the interval and window count records (h // k, window // k)

    .venv/bin/python experiments/eval_forecast.py                   # writes results/eval_forecast.json
    .venv/bin/python experiments/eval_forecast.py --traces runs/x/expert_load.jsonl --out /tmp/f.json
    .venv/bin/python experiments/eval_forecast.py --quick --out /tmp/f.json

The last line printed is `tv_periodic_over_ema_moving=<x>`: geometric mean over the moving and
jumping hot-spot traces of periodic's tv over ema's, at the first interval.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import fig_common as fc  # noqa: E402
from moepipe.config import FORECASTERS  # noqa: E402
from moepipe.placement.forecast import as_forecast  # noqa: E402
from moepipe.placement.workloads import expert_distribution  # noqa: E402
from moepipe.plugins.registry import resolve  # noqa: E402
from moepipe.train.metrics import write_json  # noqa: E402

# workloads.py kinds -> (strength, period, burst_every): the bench_placer strengths
WORKLOADS = {"none": (1.0, 50, 10), "zipf": (1.2, 50, 10), "hot_expert": (8.0, 50, 10), "hot_rank": (4.0, 50, 10),
             "rotating": (8.0, 20, 10), "burst": (8.0, 50, 10), "lognormal": (1.0, 50, 10)}
MOVING_FRACS = (0.25, 0.5, 1.0)
PERIODS = (5, 10, 20, 40, 80)
JUMP_PERIODS = (5, 20, 80)
HOT = 4.0  # the moving block's experts each get HOT times another expert's share


# ------------------------------------------------------------------ traces (probabilities per step)


def _softmax(z: np.ndarray) -> np.ndarray:
    w = np.exp(z - z.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def block_probs(E: int, width: int, offsets: np.ndarray) -> np.ndarray:
    """[steps, E]: a hot block of `width` experts starting at offsets[t] (circular)."""
    base = np.ones(E)
    base[:width] = HOT
    return np.stack([np.roll(base, int(o)) for o in offsets]) / base.sum()


def synthetic_traces(E: int, ep: int, steps: int, seed: int, quick: bool) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (family, probabilities [steps, E])."""
    rng = np.random.default_rng(seed)
    width = -(-E // ep)
    out = {}
    for kind, (strength, period, burst_every) in WORKLOADS.items():
        p = np.stack([expert_distribution(kind, t, 0, E, ep, strength, period, burst_every, seed) for t in range(steps)])
        out[kind] = ("stationary" if kind in ("none", "zipf", "hot_expert", "hot_rank", "lognormal") else kind, p)
    t = np.arange(steps)[:, None] / steps
    a, b = rng.standard_normal(E), rng.standard_normal(E)
    out["drift_linear"] = ("drift", _softmax((1 - t) * a + t * b))
    walk = np.cumsum(rng.standard_normal((steps, E)), axis=0) / math.sqrt(steps)
    out["drift_walk"] = ("drift", _softmax(rng.standard_normal(E) + walk))
    for frac in MOVING_FRACS[1:2] if quick else MOVING_FRACS:
        for period in (5, 20) if quick else PERIODS:
            shift = max(1, round(frac * width))
            out[f"moving_f{frac:g}_p{period}"] = ("moving", block_probs(E, width, shift * (np.arange(steps) // period)))
    for period in (5,) if quick else JUMP_PERIODS:
        jumps = rng.integers(0, E, steps // period + 1)
        out[f"jumping_p{period}"] = ("jumping", block_probs(E, width, jumps[np.arange(steps) // period]))
    return out


def sample_counts(p: np.ndarray, tokens: int, seed: int) -> np.ndarray:
    """Observed tokens per expert per step: multinomial draws of `tokens` assignments from p."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.multinomial(tokens, row / row.sum()) for row in p]).astype(np.float64)


def read_expert_load(path: str) -> tuple[int, dict[int, np.ndarray]]:
    """An expert_load.jsonl (moepipe.train.metrics: {"step", "tokens_per_expert": {layer: [E]}}
    per logged step) -> (steps between records, {layer: [records, E]})."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows.sort(key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    stride = int(np.median(np.diff(steps))) if len(steps) > 1 else 1
    layers = sorted({int(k) for r in rows for k in r["tokens_per_expert"]})
    return max(stride, 1), {lid: np.array([r["tokens_per_expert"][str(lid)] for r in rows], dtype=np.float64) for lid in layers}


# ------------------------------------------------------------------ scoring


def pack(load: np.ndarray, ep: int) -> np.ndarray:
    """Rank of each expert: largest first onto the least-loaded rank with a free slot (ceil(E/ep) each)."""
    E = len(load)
    slots, owner = -(-E // ep), np.empty(E, dtype=int)
    total, used = np.zeros(ep), np.zeros(ep, dtype=int)
    for e in np.argsort(-load, kind="stable"):
        free = np.flatnonzero(used < slots)
        r = free[np.argmin(total[free])]
        owner[e], total[r], used[r] = r, total[r] + load[e], used[r] + 1
    return owner


def rank_imbalance(load: np.ndarray, owner: np.ndarray, ep: int) -> float:
    per_rank = np.bincount(owner, weights=load, minlength=ep)
    return float(per_rank.max() / per_rank.mean()) if per_rank.mean() > 0 else 1.0


def score(forecast: np.ndarray, realised: np.ndarray, ep: int) -> dict[str, float]:
    f, r = forecast / max(forecast.sum(), 1e-300), realised / max(realised.sum(), 1e-300)
    imb_f, imb_r = f.max() / f.mean(), r.max() / r.mean()
    oracle = rank_imbalance(realised, pack(realised, ep), ep)
    return {"tv": 0.5 * float(np.abs(f - r).sum()), "imbalance_err": float(abs(imb_f - imb_r) / imb_r),
            "packed_regret": rank_imbalance(realised, pack(forecast, ep), ep) / oracle - 1}


def evaluate(obs: np.ndarray, names: list[str], interval: int, window: int, decay: float, ep: int) -> dict[str, dict]:
    """Mean scores per forecaster over the plan points of one trace [steps, E]."""
    fns = {n: resolve("forecaster", n) for n in names}
    sums: dict[str, dict] = {n: defaultdict(float) for n in names}
    points = list(range(window, len(obs) - interval + 1, interval))
    seconds = defaultdict(float)
    for s in points:
        realised = obs[s:s + interval].mean(axis=0)
        for n, fn in fns.items():
            history = obs[:s] if n == "ema" else obs[s - window:s]  # ema: the runtime's running average over every step
            t0 = time.perf_counter()
            f = as_forecast(fn(history, interval, decay), obs.shape[1])
            seconds[n] += time.perf_counter() - t0
            for k, v in score(f.mean, realised, ep).items():
                sums[n][k] += v
    return {n: {**{k: v / len(points) for k, v in sums[n].items()}, "points": len(points),
                "ms_per_forecast": 1e3 * seconds[n] / max(len(points), 1)} for n in names} if points else {}


# ------------------------------------------------------------------ report


def geomean(xs: list[float]) -> float:
    xs = [max(x, 1e-12) for x in xs]
    return float(math.exp(sum(math.log(x) for x in xs) / len(xs))) if xs else float("nan")


def print_table(rows: list[dict], names: list[str], interval: int, metric: str) -> None:
    sel = [r for r in rows if r["interval"] == interval]
    traces = list(dict.fromkeys(r["trace"] for r in sel))
    print(f"\n{metric} (interval {interval}; lower is better; * best)")
    print(f"{'trace':32s}" + "".join(f"{n:>10s}" for n in names))
    for t in traces:
        vals = {r["forecaster"]: r[metric] for r in sel if r["trace"] == t}
        best = min(vals.values())
        print(f"{t[:32]:32s}" + "".join(f"{vals[n]:9.4f}{'*' if vals[n] == best else ' '}" for n in names))


def summarise(rows: list[dict], names: list[str], intervals: list[int]) -> dict:
    out = {}
    for h in intervals:
        fam: dict = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["interval"] == h:
                fam[r["family"]][r["forecaster"]].append(r)
        out[str(h)] = {f: {n: {m: float(np.mean([r[m] for r in rs])) for m in ("tv", "imbalance_err", "packed_regret")}
                           for n, rs in per.items()} for f, per in fam.items()}
        wins = defaultdict(int)
        for t in {r["trace"] for r in rows if r["interval"] == h}:
            tr = [r for r in rows if r["interval"] == h and r["trace"] == t]
            wins[min(tr, key=lambda r: r["tv"])["forecaster"]] += 1
        out[str(h)]["_best_tv_count"] = dict(wins)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forecasters", nargs="+", default=list(FORECASTERS), help="names (built-ins, import paths, plug-ins)")
    ap.add_argument("--intervals", nargs="+", type=int, default=[10, 50], help="re-plan intervals = forecast horizons (steps)")
    ap.add_argument("--window", type=int, default=64, help="history steps a forecaster sees (placer.forecast_window)")
    ap.add_argument("--decay", type=float, default=0.8, help="placer.ema_decay")
    ap.add_argument("--num-experts", type=int, default=64)
    ap.add_argument("--ep", type=int, default=8, help="EP ranks (hot block width ceil(E/ep); packing)")
    ap.add_argument("--tokens", type=int, default=16384, help="token-expert assignments per step (batch x seq x top_k)")
    ap.add_argument("--steps", type=int, default=600, help="steps per synthetic trace")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", nargs="*", default=[], help="expert_load.jsonl files of moepipe-train runs")
    fc.add_output_args(ap, os.path.join(ROOT, "results", "eval_forecast.json"))
    args = ap.parse_args()
    if args.quick:
        args.intervals, args.window, args.num_experts, args.ep, args.steps, args.tokens = [10], 32, 16, 4, 140, 4096
    args.out = fc.check_output(args)
    info = fc.provenance(args, None)
    t_start = time.perf_counter()
    names = list(args.forecasters)

    traces: dict[str, tuple[str, np.ndarray, int]] = {}  # name -> (family, observed counts, stride)
    for i, (name, (family, p)) in enumerate(synthetic_traces(args.num_experts, args.ep, args.steps, args.seed, args.quick).items()):
        traces[name] = (family, sample_counts(p, args.tokens, args.seed + 1000 + i), 1)
    files = list(args.traces)
    if args.quick and not files:  # exercise the expert_load.jsonl reader on a file written here
        path = os.path.join(fc.out_dir_of(args), "eval_forecast_quick_expert_load.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        obs = traces["rotating"][1]
        with open(path, "w") as f:
            for t in range(0, len(obs), 2):
                f.write(json.dumps({"step": t + 2, "tokens_per_expert": {"0": obs[t].astype(int).tolist()}}) + "\n")
        files = [path]
    for path in files:
        stride, layers = read_expert_load(path)
        for lid, obs in layers.items():
            traces[f"run:{os.path.basename(os.path.dirname(os.path.abspath(path))) or path}:{lid}"] = ("run", obs, stride)

    rows = []
    for h in args.intervals:
        for name, (family, obs, stride) in traces.items():
            h_rec, w_rec = max(1, h // stride), max(2, args.window // stride)
            for n, m in evaluate(obs, names, h_rec, w_rec, args.decay, args.ep if obs.shape[1] >= args.ep else obs.shape[1]).items():
                rows.append({"trace": name, "family": family, "interval": h, "forecaster": n, "stride": stride, **m})
    for h in args.intervals:
        print_table(rows, names, h, "tv")
        print_table(rows, names, h, "packed_regret")
    summary = summarise(rows, names, args.intervals)
    h0 = str(args.intervals[0])
    ratio = None
    if "periodic" in names and "ema" in names:
        tv = {(r["trace"], r["forecaster"]): r["tv"] for r in rows if str(r["interval"]) == h0 and r["family"] in ("moving", "jumping")}
        ratio = geomean([tv[(t, "periodic")] / tv[(t, "ema")] for t, n in tv if n == "periodic"])
    print("\nmean per family (tv / packed_regret):")
    for h, fams in summary.items():
        for fam, per in fams.items():
            if not fam.startswith("_"):
                print(f"  interval {h:>3s} {fam:11s}" + "".join(f" {n}={v['tv']:.4f}/{v['packed_regret']:.3f}" for n, v in per.items()))
        print(f"  interval {h:>3s} best tv per trace: {fams['_best_tv_count']}")
    result = {
        "tv_periodic_over_ema_moving": ratio, "summary": summary, "rows": rows,
        "traces": {n: {"family": f, "steps": int(len(o)), "num_experts": int(o.shape[1]), "stride": s} for n, (f, o, s) in traces.items()},
        "config": {"args": vars(args), "workloads": WORKLOADS, "moving_fracs": MOVING_FRACS, "periods": PERIODS,
                   "jump_periods": JUMP_PERIODS, "hot_factor": HOT},
        "method": {"history": "the newest --window steps before the plan point (ema: all of them, its running form)",
                   "realised": "observed mean tokens per expert over the next interval steps",
                   "headline": "geomean over moving and jumping traces of periodic tv / ema tv at the first interval"},
        "wall_s": time.perf_counter() - t_start, "provenance": info,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, result)
    print(f"tv_periodic_over_ema_moving={ratio if ratio is not None else float('nan'):.4f}")


if __name__ == "__main__":
    main()
