"""Every number README.md and docs/*.md quote from results/*.json, and how the text states it.

Two kinds of entry:
- Claim: a sentence fragment with `{field:format}` slots, the results files it reads and a
  function computing the fields. The docs must contain the fragment with exactly those values
  (whitespace, including line breaks, is free). The fragment is found by a pattern made from
  the template (numbers in the slots, the literal text around them), so a stale number is
  reported with the text that should replace it.
- Block: a generated table between `<!-- results:NAME -->` and `<!-- /results:NAME -->`
  lines; its body must equal what the renderer makes from the results files.

    python analysis/doc_claims.py           # check: list every claim, exit 1 if any is stale or missing
    python analysis/doc_claims.py --fix     # rewrite stale numbers and blocks in the docs from results/

tests/test_results_docs.py runs the check. After rerunning experiments, `--fix` updates the
numbers; prose that interprets them still needs reading.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import string
import sys
from dataclasses import dataclass
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2.0**20
NUMBER = r"[-+\u2212]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:e[-+]?\d+)?%?"


class _Fmt(string.Formatter):
    """str.format plus a trailing 'U' in a spec: typographic minus (−) as the docs write it."""

    def format_field(self, value, spec):
        if spec.endswith("U"):
            return super().format_field(value, spec[:-1]).replace("-", "\u2212")
        return super().format_field(value, spec)


FMT = _Fmt()


@dataclass
class Claim:
    doc: str  # path relative to the repository root
    template: str  # text with {field:format} slots
    results: tuple[str, ...]  # results/<name>.json files read
    values: Callable[..., dict]  # values(*loaded results) -> {field: value}

    def render(self, data: dict) -> str:
        return FMT.format(self.template, **self.values(*(data[r] for r in self.results)))

    def pattern(self) -> re.Pattern:
        parts = []
        for literal, field, spec, _conv in string.Formatter().parse(self.template):
            parts.append(r"\s+".join(re.escape(w) for w in re.split(r"\s+", literal)) if literal.strip() else (r"\s+" if literal else ""))
            if field is not None:  # a number where the spec formats one, else a word
                parts.append(NUMBER if spec and spec.rstrip("U")[-1:] in "eEfFgGdn%," else r"\S+?")
        return re.compile("".join(parts))


@dataclass
class Block:
    doc: str
    name: str
    results: tuple[str, ...]
    render_fn: Callable[..., str]

    def render(self, data: dict) -> str:
        return self.render_fn(*(data[r] for r in self.results)).strip("\n")

    def pattern(self) -> re.Pattern:
        return re.compile(rf"(<!-- results:{re.escape(self.name)} -->\n)(.*?)(\n<!-- /results:{re.escape(self.name)} -->)", re.S)


# ---------------------------------------------------------------------------- helpers


def _bench_dynamic(d: dict) -> dict:
    """Paired per-round speedups (static_r / topo_r, geomean over scenarios): range over the runs."""
    per_round = d.get("speedup_per_round")
    if per_round is None:  # files written before the script recorded it: the same from all_wall_s
        sc = d["scenarios"].values()
        per_round = [math.exp(statistics.mean(math.log(s["all_wall_s"]["static"][r] / s["all_wall_s"]["topo"][r]) for s in sc))
                     for r in range(d["rounds"])]
    steady = d["steady_state_speedup"]
    return {"lo": min(per_round), "hi": max(per_round), "n": len(per_round), "median": d["speedup"], "steps": d["steps"], "steady": steady}


def _sim_errors(d: dict) -> dict:
    rows = d["rows"]
    unpaired = {k: r["relative_error"] for k, r in rows.items()}
    worst_unpaired = max(unpaired, key=lambda k: abs(unpaired[k]))
    return {"paired": d["worst_relative_error"], "unpaired": d["worst_relative_error_unpaired"], "n": len(rows),
            "lo": min(unpaired.values()), "hi": max(unpaired.values()), "worst_unpaired_schedule": worst_unpaired,
            **{f"p_{k}": r["paired_relative_error"] for k, r in rows.items()},
            "load0": d["loadavg_before_after"][0][0], "load1": d["loadavg_before_after"][1][0], "wall": d["wall_s"]}


def _placer(d: dict) -> dict:
    return {"speedup": d["geomean_speedup_topo_vs_static_skewed"], "bal": d["mean_topo_over_balanced_bound"],
            "free": d["mean_topo_over_balanced_bound_free_comm"], "slower": d["cases_topo_slower_than_eplb_realised"],
            "solve": d["scale_1024"]["topo"]["solve_time_s"], "solve_cpu": d["scale_1024"]["topo"]["solve_cpu_s"]}


def _f3(x) -> str:
    return "–" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------- tables (blocks)


def table_bubble(d: dict) -> str:
    pp = d["measured_pp"]
    rows = {(r["schedule"], r["m"]): r for r in d["rows"] if r["pp"] == pp and r.get("measured") is not None}
    ms = sorted({m for _s, m in rows})
    out = ["| m | formula | GPipe measured | GPipe replay | 1F1B measured | 1F1B replay |", "|---|---|---|---|---|---|"]
    for m in ms:
        g, o = rows.get(("gpipe", m)), rows.get(("1f1b", m))
        f = (g or o)["formula"]
        out.append(f"| {m} | {f:.3f} | {_f3(g and g['measured'])} | {_f3(g and g['replay'])} | {_f3(o and o['measured'])} | {_f3(o and o['replay'])} |")
    return "\n".join(out)


def table_memory(d: dict) -> str:
    rows = {(r["schedule"], r["pp"], r["stage"]): r for r in d["rows"]}
    out = ["| pp | stage | GPipe in flight (MiB) | 1F1B in flight (MiB) | expected GPipe / 1F1B |", "|---|---|---|---|---|"]
    for pp, stage in sorted({(p, s) for _x, p, s in rows}):
        g, o = rows[("gpipe", pp, stage)], rows[("1f1b", pp, stage)]
        out.append(f"| {pp} | {stage} | {g['measured_inflight']:.2f} ({g['peak_saved_mib']:.1f}) | {o['measured_inflight']:.2f} ({o['peak_saved_mib']:.1f}) "
                   f"| {g['expected_inflight']} / {o['expected_inflight']} |")
    return "\n".join(out)


def table_interleaved(d: dict) -> str:
    out = ["| v | measured | formula | replay | pipeline time |", "|---|---|---|---|---|"]
    for r in d["measured"]:
        v = f"{r['v']} (1F1B)" if r["v"] == 1 else str(r["v"])
        out.append(f"| {v} | {r['measured']:.3f} | {r['formula']:.3f} | {r['replay']:.3f} | {r['makespan_s']:.2f} s |")
    return "\n".join(out)


def table_zero_bubble_sim(d: dict) -> str:
    rows = {(r["schedule"], r["pp"]): r for r in d["rows"]}
    pps = sorted({p for _s, p in rows}, reverse=True)
    big, small = pps[0], pps[-1]
    out = [f"| schedule | bubble p={big} (formula) | time vs 1F1B, p={big} | memory vs 1F1B, p={big} | bubble p={small} |", "|---|---|---|---|---|"]
    for (s, p), r in rows.items():
        if p != big:
            continue
        f = "no closed form here" if r["bubble_formula"] is None else f"{r['bubble_formula']:.3f}"
        out.append(f"| {s} | {r['bubble_simulated']:.3f} ({f}) | {r['time_rel_1f1b']:.2f} | {r['memory_rel_1f1b']:.2f} | {rows[(s, small)]['bubble_simulated']:.3f} |")
    return "\n".join(out)


def table_zero_bubble_measured(d: dict) -> str:
    out = ["| schedule | bubble (replay) | pipeline vs 1F1B | peak saved MiB per rank | vs 1F1B |", "|---|---|---|---|---|"]
    for r in d["measured"]:
        name = r["schedule"] + (f" ({r['runtime']})" if r.get("runtime", "torch") != "torch" else "")
        out.append(f"| {name} | {r['bubble_measured']:.2f} ({r['replay']:.2f}) | {r['pipeline_rel_1f1b']:.2f} | "
                   f"{' / '.join(f'{x:.1f}' for x in r['peak_saved_mib_per_rank'])} | {r['peak_saved_rel_1f1b']:.2f} |")
    return "\n".join(out)


def table_capacity(d: dict) -> str:
    out = ["| capacity factor | dropped (mean over run) | dropped (last step) | train loss | val loss |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        cf = "dropless" if r["capacity_factor"] <= 0 else f"{r['capacity_factor']:g}"
        out.append(f"| {cf} | {r['dropped_frac_mean']:.1%} | {r['dropped_frac_final']:.1%} | {r['final_train_loss']:.3f} | {r['final_val_loss']:.3f} |")
    return "\n".join(out)


BALANCE_LABELS = {"aux_loss": "aux loss (moe=default, 0.01)", "aux_free": "aux-loss-free bias (experiment=aux_free, rate {rate:g})",
                  "none": "none (aux_loss_coef=0)"}


def table_balance(d: dict) -> str:
    out = ["| variant | max/mean, first log | max/mean, last quarter | CV, last quarter | val loss |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        label = BALANCE_LABELS.get(r["variant"], r["variant"]).format(rate=d["variants"][r["variant"]]["moe"].get("bias_update_rate", 0))
        out.append(f"| {label} | {r['max_over_mean_first']:.2f} | {r['max_over_mean_last_quarter']:.2f} | {r['cv_last_quarter']:.2f} | {r['final_val_loss']:.3f} |")
    return "\n".join(out)


PLACEMENT_SCENARIOS = {"skew": "`skew`: pp1 x ep2, hot expert rotating every 20 steps", "slow": "`slow`: pp2, worker 0 emulated at half speed"}


def _split(layers) -> str:
    return "/".join(str(b - a) for a, b in layers)


def table_placement_measured(d: dict) -> str:
    out = ["| measured scenario | static | eplb | topo |", "|---|---|---|---|"]
    for scen, label in PLACEMENT_SCENARIOS.items():
        cells = []
        for placer in ("static", "eplb", "topo"):
            r = next(x for x in d["measured"] if x["scenario"] == scen and x["placer"] == placer)
            if placer == "static":
                cells.append(f"{r['wall_s']:.1f} s")
                continue
            n = r["migrations"]
            moves = [e["stage_layers"] for e in r["events"] if e.get("migrate") and e.get("stage_layers")]
            blocks = sorted({_split(m) for m in moves if len(m) > 1})
            what = f", blocks per stage now {', '.join(blocks)}" if blocks else ""
            cells.append(f"{r['wall_s']:.1f} s ({r['speedup_vs_static']:.2f}x, {n} migration{'' if n == 1 else 's'}{what})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def table_placement_simulated(d: dict) -> str:
    out = ["| simulated GPUs | eplb (H100) | topo (H100) | eplb (A100+H100) | topo (A100+H100) |", "|---|---|---|---|---|"]
    sim = d["simulated"]
    for n in sorted({r["devices"] for r in sim}):
        rows = {(r["placer"], r["hetero"]): r for r in sim if r["devices"] == n}
        r0 = rows[("static", False)]
        mesh = f"pp{r0['pp']} x ep{r0['ep']}" + (f" x dp{r0['dp']}" if r0["dp"] > 1 else "")
        cells = [f"{rows[(p, h)]['speedup_vs_static']:.2f}x" for h in (False, True) for p in ("eplb", "topo")]
        out.append(f"| {n:,} ({mesh}) | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------- the table of claims

README, RESULTS_MD, SIMULATOR = "README.md", "docs/RESULTS.md", "docs/SIMULATOR.md"


def _zb_range(d: dict, runtime: str) -> dict:
    """Peak saved activations of interleaved_zb and zbv relative to 1F1B, under one runtime
    (rows without a `runtime` field predate lean W: torch's)."""
    rel = [r["peak_saved_rel_1f1b"] for r in d["measured"]
           if r["schedule"] in ("interleaved_zb", "zbv") and r.get("runtime", "torch").startswith(runtime)]
    return {"lo": min(rel), "hi": max(rel)}

CLAIMS: list = [
    # README "Status"
    Claim(README, "fidelity vs real CPU runs: worst error over {n} schedules {paired:.1%} paired, {unpaired:.1%} unpaired",
          ("bench_sim",), _sim_errors),
    Claim(README, "simulated: {speedup:.2f}x over static on skewed loads, within {bal:.2f}x of the balanced bound with unavoidable "
                  "communication ({free:.2f}x of the free-communication one), slower than eplb in {slower} cases, topo solve at 1,024 "
                  "devices {solve_cpu:.1f} CPU-s", ("bench_placer",), _placer),
    Claim(README, "real CPU runs {lo:.3f}-{hi:.3f}x over static across {n} runs of {steps} steps (`bench_dynamic.py`; median {median:.3f})",
          ("bench_dynamic",), _bench_dynamic),
    Claim(README, "a migration needs no second copy of the state (`bench_migration_memory.py`: resident memory grows by "
                  "{this:.1f} MB per rank during a migration, {ref:.0f} MB when the state was copied)", ("bench_migration_memory",),
          lambda d: {k: statistics.fmean(r["peak_growth_mb"] for r in d["variants"][k]) for k in ("this", "ref")}),
    # README benchmark list
    Claim(README, "simulator speed at 1,024 devices ({t:.2f} s to simulate one {sched} iteration of {events:,} events",
          ("bench_sim_scale",), lambda d: {"t": d["sim_time_s"], "sched": d["schedule"], "events": d["events"]}),
    # docs/RESULTS.md
    Claim(RESULTS_MD, "The simulation matches the formula to {x:.0e} for both schedules", ("fig_bubble",),
          lambda d: {"x": max(abs(r["simulated"] - r["formula"]) for r in d["rows"])}),
    Claim(RESULTS_MD, "simulated p=4, m=8 schedules (bubble {x:.1%} for both)", ("fig_bubble",),
          lambda d: {"x": next(r["simulated"] for r in d["rows"] if r["pp"] == 4 and r["m"] == 8)}),
    Claim(RESULTS_MD, "One microbatch saves {a:.1f} MiB on a 2-block stage and {b:.1f} MiB on a 1-block stage", ("fig_memory",),
          lambda d: {"a": next(r["bytes_per_microbatch"] for r in d["rows"] if r["pp"] == 2 and r["stage"] == 0) / MIB,
                     "b": next(r["bytes_per_microbatch"] for r in d["rows"] if r["pp"] == 4 and r["stage"] == 0) / MIB}),
    Claim(RESULTS_MD, "The worst deviation is {x:.3f} microbatch", ("fig_memory",),
          lambda d: {"x": max(abs(r["measured_inflight"] - r["expected_inflight"]) for r in d["rows"])}),
    Claim(RESULTS_MD, "Bubble time / ideal compute equals (p−1)/(v·m) exactly (max error {x:.0e})", ("fig_interleaved",),
          lambda d: {"x": max(abs(r["ratio_simulated"] - r["ratio_formula"]) for r in d["rows"])}),
    Claim(RESULTS_MD, "p=4, m=8 gives {a:.3f}, {b:.3f}, {c:.3f}, {e:.3f} for v = 1, 2, 4, 8", ("fig_interleaved",),
          lambda d: dict(zip("abce", [next(r["ratio_simulated"] for r in d["rows"] if r["pp"] == 4 and r["m"] == 8 and r["v"] == v) for v in (1, 2, 4, 8)]))),
    Claim(RESULTS_MD, "torch's zero-bubble paths hold {lo:.1f}–{hi:.1f}× the activations of 1F1B", ("fig_zero_bubble",),
          lambda d: _zb_range(d, "torch")),
    Claim(RESULTS_MD, "Chimera / 1F1B throughput at pp=2: formula {f2:.2f}, {f4:.2f}, {f8:.3f} and measured {m2:.2f}, {m4:.2f}, "
                      "{m8:.2f} at m = 2, 4, 8", ("fig_chimera",),
          lambda d: {**{f"f{m}": d["throughput_relative_to_1f1b"][str(m)]["formula"] for m in (2, 4, 8)},
                     **{f"m{m}": d["throughput_relative_to_1f1b"][str(m)]["measured"] for m in (2, 4, 8)}}),
    Claim(RESULTS_MD, "{n_feasible} of {n_considered} meshes fit; the search chooses tp{tp} x pp{pp} x ep{ep} x dp{dp} at "
                      "{tok:,.0f} tokens/s, {speedup:.2f}x the best mesh without TP", ("fig_tp_mesh",),
          lambda d: {"n_feasible": d["n_feasible"], "n_considered": d["n_considered"], "tp": d["chosen"]["tp"], "pp": d["chosen"]["pp"],
                     "ep": d["chosen"]["ep"], "dp": d["chosen"]["dp"], "tok": d["chosen"]["tokens_per_s"],
                     "speedup": d["speedup_chosen_vs_best_tp1"]}),
    Claim(RESULTS_MD, "moepipe's executor with lean W holds {lo:.2f}–{hi:.2f}× for the same two schedules", ("fig_zero_bubble",),
          lambda d: _zb_range(d, "moepipe")),
    Claim(RESULTS_MD, "and the migration ({lo:.2f}–{hi:.2f} s of stage and optimizer rebuild each on this CPU)", ("fig_placement",),
          lambda d: {"lo": min(e["migration_s"] for r in d["measured"] if r["scenario"] == "skew" for e in r["events"] if e.get("migrate")),
                     "hi": max(e["migration_s"] for r in d["measured"] if r["scenario"] == "skew" for e in r["events"] if e.get("migrate"))}),
    Claim(RESULTS_MD, "topo is {lo:.3f}-{hi:.3f}x faster than static over {steps} steps across {n} runs (paired per run; median-based "
                      "{median:.3f}, steady state {steady:.2f}x)", ("bench_dynamic",), _bench_dynamic),
    Claim(RESULTS_MD, "the simulator's worst error over {n} schedules is {paired:.1%} paired (each round's prediction against the "
                      "steps right after its profile) and {unpaired:.1%} unpaired (median prediction against median measurement; "
                      "unpaired errors {lo:+.1%} to {hi:+.1%})", ("bench_sim",), _sim_errors),
    # docs/SIMULATOR.md (another owner's prose; its numbers are checked all the same)
    Claim(SIMULATOR, "loadavg {load0:.1f}→{load1:.1f} during the run, `.venv/bin/python experiments/bench_sim.py`, {wall:.0f} s): "
                     "paired errors gpipe {p_gpipe:+.1%U}, 1f1b {p_1f1b:+.1%U}, interleaved_1f1b {p_interleaved_1f1b:+.1%U}, "
                     "interleaved_zb {p_interleaved_zb:+.1%U}, zbv {p_zbv:+.1%U}, dualpipev {p_dualpipev:+.1%U}: "
                     "`worst_relative_error={paired:.3f}`", ("bench_sim",), _sim_errors),
    Claim(SIMULATOR, "The unpaired errors (median prediction vs median measurement over rounds) reach {unpaired:.0%}", ("bench_sim",), _sim_errors),
    # tables
    Block(RESULTS_MD, "fig_bubble", ("fig_bubble",), table_bubble),
    Block(RESULTS_MD, "fig_memory", ("fig_memory",), table_memory),
    Block(RESULTS_MD, "fig_interleaved", ("fig_interleaved",), table_interleaved),
    Block(RESULTS_MD, "fig_zero_bubble_simulated", ("fig_zero_bubble",), table_zero_bubble_sim),
    Block(RESULTS_MD, "fig_zero_bubble_measured", ("fig_zero_bubble",), table_zero_bubble_measured),
    Block(RESULTS_MD, "fig_capacity", ("fig_capacity",), table_capacity),
    Block(RESULTS_MD, "fig_balance", ("fig_balance",), table_balance),
    Block(RESULTS_MD, "fig_placement_measured", ("fig_placement",), table_placement_measured),
    Block(RESULTS_MD, "fig_placement_simulated", ("fig_placement",), table_placement_simulated),
]


# ---------------------------------------------------------------------------- checking and fixing


def load_results(results_dir: str, names) -> dict:
    out = {}
    for n in sorted(set(names)):
        with open(os.path.join(results_dir, f"{n}.json")) as f:
            out[n] = json.load(f)
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def check(root: str = ROOT, results_dir: str | None = None, claims=None) -> list[dict]:
    """One row per claim: doc, expected text, the text found (None: pattern absent), ok."""
    claims = CLAIMS if claims is None else claims
    data = load_results(results_dir or os.path.join(root, "results"), [r for c in claims for r in c.results])
    docs: dict[str, str] = {}
    report = []
    for c in claims:
        text = docs.setdefault(c.doc, open(os.path.join(root, c.doc)).read())
        expected = c.render(data)
        found = [m.group(2) if isinstance(c, Block) else m.group(0) for m in c.pattern().finditer(text)]
        ok = bool(found) and all((f.strip("\n") if isinstance(c, Block) else _norm(f)) == expected for f in found)
        label = f"block {c.name}" if isinstance(c, Block) else c.template[:60]
        report.append({"doc": c.doc, "claim": label, "expected": expected, "found": found, "ok": ok, "results": c.results})
    return report


def fix(root: str = ROOT, results_dir: str | None = None, claims=None) -> list[str]:
    """Rewrite every stale claim/block in place; returns the docs changed. Absent claims are left
    for a person to place (the check keeps failing until they are)."""
    claims = CLAIMS if claims is None else claims
    data = load_results(results_dir or os.path.join(root, "results"), [r for c in claims for r in c.results])
    changed = []
    for doc in sorted({c.doc for c in claims}):
        path = os.path.join(root, doc)
        text = before = open(path).read()
        for c in (c for c in claims if c.doc == doc):
            expected = c.render(data)
            if isinstance(c, Block):
                text = c.pattern().sub(lambda m: m.group(1) + expected + m.group(3), text)
            else:
                text = c.pattern().sub(lambda m: m.group(0) if _norm(m.group(0)) == expected else expected, text)
        if text != before:
            with open(path, "w") as f:
                f.write(text)
            changed.append(doc)
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fix", action="store_true", help="rewrite stale numbers and tables from results/")
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    args = ap.parse_args()
    if args.fix:
        for doc in fix(ROOT, args.results):
            print(f"updated {doc}")
    bad = 0
    for r in check(ROOT, args.results):
        bad += not r["ok"]
        state = "ok     " if r["ok"] else ("MISSING" if not r["found"] else "STALE  ")
        print(f"{state} {r['doc']}: {r['claim']}")
        if not r["ok"]:
            print(f"        expected: {r['expected']}")
            for f in r["found"]:
                print(f"        found:    {_norm(f) if '|' not in f else f}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
