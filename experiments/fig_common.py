"""Shared pieces of the paper-reproduction scripts (experiments/fig_*.py).

- provenance and results files (JSON + CSV under results/, via moepipe's atomic write_json);
- the pipeline-bubble formulas and uniform-stage simulation (moepipe.sim with free communication);
- `measure_pipeline`: real pipeline-parallel training steps with every compute action timed and
  the bytes autograd saves for backward counted per stage rank (no change to moepipe needed:
  the schedule's stage methods are wrapped from outside, and memory is counted with
  torch.autograd.graph.saved_tensors_hooks).

What "measured" means here (the same definitions in every figure):
  busy_r       wall seconds rank r spends inside forward_one_chunk / backward_one_chunk /
               backward_weight_one_chunk / the loss, during one schedule.step;
  makespan     from the first rank entering schedule.step to the last rank leaving it
               (time.perf_counter is CLOCK_MONOTONIC: one clock for all local processes);
  bubble       1 - sum_r busy_r / (pp * makespan): the simulator's definition, so waiting on
               peers, point-to-point transfers and the runtime's own per-action work all count
               as bubble;
  saved bytes  the storage bytes of tensors autograd holds for backward (parameters and buffers
               excluded, a storage counted once however often it is saved), live on a rank at
               any moment of a step; peak = max over the step.
Timings on a shared CPU are noisy: scripts report medians over rounds and compare schedules
run side by side in the same processes (order rotated per round).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on the shared cores

import numpy as np  # noqa: E402

RESULTS = os.path.join(ROOT, "results")
# --quick: the tiny model shrunk to a few hundred thousand parameters (2 blocks, d_model 32)
QUICK_MODEL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "moe.expert_hidden=32"]
FIGURES = os.path.join(ROOT, "figures")


# ---------------------------------------------------------------------------- results files


def provenance(args: Any = None, overrides: Any = None, seed: int | None = None) -> dict:
    """What every results file records (under "provenance"): the command line and parsed
    arguments, config overrides, seed, git commit of the code that ran (moepipe's checkout and
    the experiments' own, '-dirty' if either had uncommitted changes), package versions,
    machine and load."""
    import moepipe
    from moepipe.train.run_info import git_state, run_info

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    info = run_info()
    experiments_commit = git_state(ROOT)
    if experiments_commit != info.get("git_commit"):  # scripts and library from different checkouts: record both
        info["experiments_git_commit"] = experiments_commit
    if seed is None and args is not None:
        seed = getattr(args, "seed", None)
    return {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv and sys.argv[0] else "?", *sys.argv[1:]]),
        "args": vars(args) if args is not None and hasattr(args, "__dict__") else args,
        "config_overrides": overrides,
        "seed": seed,
        "moepipe_path": os.path.dirname(os.path.abspath(moepipe.__file__)),
        "loadavg_at_start": load,
        "timing_note": "CPU timings on a shared, loaded machine are noisy: compare rows of one file, not files",
        **info,
    }


# ---------------------------------------------------------------------------- command line and output


def add_output_args(ap, default_out: str, quick_help: str = "smallest sizes, same code path (for tests)") -> None:
    """--out (the results JSON), --quick and --allow-dirty: the options every experiments/*.py has."""
    ap.add_argument("--out", default=default_out, help=f"results JSON path (default {os.path.relpath(default_out, ROOT)})")
    ap.add_argument("--quick", action="store_true", help=quick_help + "; needs --out outside results/")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="write into results/ even from a checkout with uncommitted changes (the file records '-dirty')")


def in_results_dir(path: str) -> bool:
    """True for a path directly inside a directory named results/ (this checkout's or another's)."""
    return os.path.basename(os.path.dirname(os.path.realpath(path))) == "results"


def check_output(args, out: str | None = None) -> str:
    """Refuse outputs that would make results/ lie: quick (test-sized) numbers into results/, or
    numbers from code with uncommitted changes (unless --allow-dirty). Returns the output path."""
    out = os.path.abspath(out or args.out)
    if not in_results_dir(out):
        return out
    if getattr(args, "quick", False):
        sys.exit(f"{os.path.basename(sys.argv[0])}: --quick writes test-sized numbers: give --out outside results/ (got {out})")
    if not getattr(args, "allow_dirty", False):
        import moepipe
        from moepipe.train.run_info import git_state

        for where in (ROOT, os.path.dirname(os.path.abspath(moepipe.__file__))):
            state = git_state(where)
            if state is None or state.endswith("-dirty"):
                sys.exit(f"{os.path.basename(sys.argv[0])}: {where} is {'not a git checkout' if state is None else 'a dirty checkout'}; "
                         f"results/ records clean commits only: commit first, or run from a clean worktree "
                         f"(experiments/rerun_all.sh), or pass --allow-dirty")
    return out


def out_dir_of(args) -> str:
    """Folder of the results file (CSV files and quick-mode run dirs/figures go beside it)."""
    return os.path.dirname(os.path.abspath(args.out))


def figures_dir_of(args) -> str:
    """figures/ for real runs; quick mode draws beside its results file."""
    return os.path.join(out_dir_of(args), "figures") if args.quick else FIGURES


def headline(key: str, value: Any, fmt: str = ".4f") -> None:
    """The last line a script prints: `key=value`, what tests and docs look for."""
    print(f"{key}={value:{fmt}}" if isinstance(value, (int, float)) else f"{key}={value}", flush=True)


def save_results(name: str, payload: dict, rows: list[dict] | None = None, out_dir: str = RESULTS) -> str:
    """results/<name>.json (payload, with rows under "rows") and results/<name>.csv (rows)."""
    from moepipe.train.metrics import write_json

    os.makedirs(out_dir, exist_ok=True)
    if rows is not None:
        payload = {**payload, "rows": rows}
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys and not isinstance(r[k], (list, dict))]
        tmp = os.path.join(out_dir, f"{name}.csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, os.path.join(out_dir, f"{name}.csv"))
    path = os.path.join(out_dir, f"{name}.json")
    write_json(path, payload)
    return path


def draw(name: str, results_dir: str = RESULTS, figures_dir: str = FIGURES) -> list[str]:
    """Redraw one figure from its results file (analysis/figures.py)."""
    from analysis.figures import draw_figure

    return draw_figure(name, results_dir, figures_dir)


def save_and_draw(name: str, payload: dict, rows: list[dict] | None, args) -> tuple[str, list[str]]:
    """Write the results file at args.out (and the CSV beside it), then draw figure `name` from
    that file into figures/ (quick mode: into a figures/ folder beside the results file)."""
    from analysis.figures import DRAWERS

    stem = os.path.splitext(os.path.basename(args.out))[0]
    path = save_results(stem, payload, rows, out_dir=out_dir_of(args))
    with open(path) as f:
        res = json.load(f)
    return path, DRAWERS[name](res, figures_dir_of(args))


# ---------------------------------------------------------------------------- formulas and simulation


def bubble_formula(p: int, m: int, v: int = 1) -> float:
    """Idle fraction of a pipeline of p ranks, m microbatches, v chunks per rank (uniform stages):
    GPipe / 1F1B (v=1): (p-1)/(m+p-1); interleaved 1F1B: ((p-1)/v)/(m+(p-1)/v)."""
    q = (p - 1) / v
    return q / (m + q)


def bubble_ratio_formula(p: int, m: int, v: int = 1) -> float:
    """Bubble time over ideal compute time (Narayanan et al. 2021): (p-1)/(v*m)."""
    return (p - 1) / (v * m)


def zb_bubble_formula(p: int, m: int) -> float:
    """torch's ZB orders with 2 chunks per rank and F = I = W per chunk: (p-1) chunk-units of
    idle per rank over 6m units of work (Qi et al. 2023, ZB-1P/ZB-V)."""
    return (p - 1) / (6 * m + p - 1)


def uniform_profile(n_layers: int, seconds: float = 1e-3) -> dict:
    """A profile in which every block costs `seconds` per phase (F, I, W) and nothing else costs."""
    zero = {"fwd_s": 0.0, "bwd_s": 0.0}
    return {
        "version": 1,
        "device": {"name": "uniform", "tflops": 1.0, "speed": 1.0},
        "tokens_per_microbatch": 1024,
        "layers": {str(i): {"fwd_s": seconds, "bwd_input_s": seconds, "bwd_weight_s": seconds} for i in range(n_layers)},
        "embedding": dict(zero),
        "head": dict(zero),
        "expert_per_token_s": dict(zero),
    }


def simulate_uniform(schedule: str, pp: int, m: int, v: int = 1, n_layers: int | None = None):
    """moepipe.sim.simulate on uniform stages (n_layers/(pp*v) blocks per stage, default one;
    F = I = W = 1 ms per block) with free communication: the setting of the papers' formulas."""
    from moepipe.config import ModelConfig, MoEConfig, TrainConfig, moe_layer_ids
    from moepipe.placement.cost_model import CostModel
    from moepipe.placement.model_spec import build_model_spec
    from moepipe.placement.plan import static_plan
    from moepipe.placement.topology import free_topology
    from moepipe.sim import simulate
    from moepipe.sim.schedules import plan_style

    n_layers = n_layers or pp * v
    model = ModelConfig(vocab_size=256, d_model=64, n_layers=n_layers, n_heads=4, ffn_hidden=128, max_seq_len=64)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=64)
    train = TrainConfig(batch_size=16 * m, seq_len=64)
    spec = build_model_spec(model, moe, train, microbatches=m, dtype_bytes=2)
    cm = CostModel(spec, profile=uniform_profile(n_layers))
    plan = static_plan(n_layers, moe_layer_ids(model, moe), moe.num_experts, pp=pp, ep=1, virtual_stages=v, style=plan_style(schedule))
    return simulate(plan, schedule, m, free_topology(pp), cm, free_comm=True)


def inflight_units(schedule: str, pp: int, m: int, v: int = 1) -> dict:
    """Activation memory of uniform stages in units of one microbatch through one rank's share of
    the model (a chunk counts 1/v), from the simulator's engine: peak per stage (microbatches)
    and peak per rank (simultaneous sum over its chunks)."""
    from moepipe.sim import schedule_order, simulate_order

    order, s2r = schedule_order(schedule, pp, v, m)
    res = simulate_order(order, s2r, m, np.tile([1.0, 1.0, 1.0], (pp * v, 1)))
    per_stage = np.zeros(pp * v, dtype=int)
    per_rank = []
    for r in range(pp):
        snaps = res.inflight[r]
        per_stage = np.maximum(per_stage, snaps.max(0))
        per_rank.append(float(snaps.sum(1).max()) / v)
    return {"peak_inflight_per_stage": per_stage.tolist(), "peak_units_per_rank": per_rank, "stage_to_pp_rank": s2r}


def timeline_rows(res, max_rows: int = 4000) -> list[list]:
    """A simulated timeline's compute events as [rank, kind, stage, mb, start_s, end_s] rows."""
    return [[r, k, s, i, a, b] for r, lane, k, s, i, a, b in res.timeline.rows() if lane == 0 and k != "idle"][:max_rows]


# ---------------------------------------------------------------------------- real runs


class _Saved:
    """What autograd keeps in place of a saved tensor: the tensor plus a ticket that is returned
    to the probe when autograd frees it (the graph is released after backward)."""

    __slots__ = ("t", "probe", "key")

    def __init__(self, probe: "Probe", t, key: int, nbytes: int):
        self.t, self.probe, self.key = t, probe, key
        probe._hold(key, nbytes)

    def __del__(self):
        self.probe._release(self.key)


class Probe:
    """Times a rank's compute actions and counts the activation bytes it holds (see module doc)."""

    def __init__(self, trainer):
        import torch

        self.torch = torch
        self.cuda = trainer.device.type == "cuda"
        self.excluded = set()
        for module in trainer.modules.values():
            for t in list(module.parameters()) + list(module.buffers()):
                self.excluded.add(t.untyped_storage().data_ptr())
        self.events: list[list] = []  # [kind, stage, mb, start, end]
        self.step_span: tuple[float, float] | None = None
        self.memory = False
        self.stage = -1
        self.live: dict[int, list] = {}  # storage ptr -> [refs, bytes, stage]
        self.live_bytes, self.peak_bytes = 0, 0
        self.stage_live: dict[int, int] = defaultdict(int)
        self.stage_peak: dict[int, int] = defaultdict(int)
        self.new_bytes: dict[int, int] = defaultdict(int)
        self._wrap(trainer.schedule)

    # --- memory
    def _hold(self, key: int, nbytes: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[0] += 1
            return
        self.live[key] = [1, nbytes, self.stage]
        self.live_bytes += nbytes
        self.stage_live[self.stage] += nbytes
        self.new_bytes[self.stage] += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.stage_peak[self.stage] = max(self.stage_peak[self.stage], self.stage_live[self.stage])

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[key]
            self.live_bytes -= entry[1]
            self.stage_live[entry[2]] -= entry[1]

    def _pack(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.excluded or t.device.type == "meta" or st.nbytes() == 0:
            return t
        return _Saved(self, t, key, st.nbytes())

    @staticmethod
    def _unpack(x):
        return x.t if isinstance(x, _Saved) else x

    # --- timing
    def _timed(self, fn, kind_of):
        probe = self

        def timed(*a, **k):
            label = kind_of(*a, **k)
            if label is not None:
                probe.stage = label[1]
            if probe.cuda:
                probe.torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if probe.cuda:
                    probe.torch.cuda.synchronize()
                if label is not None:
                    probe.events.append([label[0], label[1], label[2], t0, time.perf_counter()])

        return timed

    def _wrap(self, sched) -> None:
        # torch's multi- and single-stage classes, or moepipe's executor (whose stage ids also
        # number a second model replica's stages: chimera)
        stages = getattr(sched, "_stages", None) or getattr(sched, "_stage_list", None) or [sched._stage]
        ids = {id(st): s for s, st in sched.stages.items()} if isinstance(getattr(sched, "stages", None), dict) else {}
        for st in stages:
            s = ids.get(id(st), st.stage_index)

            def bwd_label(mb, *a, _s=s, **k):
                full = k.get("full_backward", a[1] if len(a) > 1 else True)
                return ("B" if full else "I", _s, mb)

            st.forward_one_chunk = self._timed(st.forward_one_chunk, lambda mb, *a, _s=s, **k: ("F", _s, mb))
            st.backward_one_chunk = self._timed(st.backward_one_chunk, bwd_label)
            st.backward_weight_one_chunk = self._timed(st.backward_weight_one_chunk, lambda mb, *a, _s=s, **k: ("W", _s, mb))
        # The loss runs on the last stage between its forward and its backward.
        if hasattr(sched, "_maybe_compute_loss") and not ids:
            sched._maybe_compute_loss = self._timed(
                sched._maybe_compute_loss, lambda stage, out, tgt, mb, *a, **k: ("loss", stage.stage_index, mb) if stage.is_last else None
            )
        else:  # moepipe's executor computes the loss right after the last stage's forward (stage unknown here)
            sched._compute_loss = self._timed(sched._compute_loss, lambda *a, **k: ("loss", -1, -1))
        step = sched.step

        def step_wrapped(*a, **k):
            self.events = []
            t0 = time.perf_counter()
            try:
                if self.memory:
                    with self.torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                        return step(*a, **k)
                return step(*a, **k)
            finally:
                self.step_span = (t0, time.perf_counter())

        sched.step = step_wrapped
        # moepipe's lean W keeps each Linear's input and output gradient from I to W outside
        # autograd's saved tensors: counted the same way while memory is measured
        for lean in getattr(sched, "lean", {}).values():
            lean.pack = lambda t: self._pack(t) if self.memory else t
            lean.unpack = self._unpack

    def reset_memory(self) -> None:
        self.live.clear()
        self.live_bytes = self.peak_bytes = 0
        for d in (self.stage_live, self.stage_peak, self.new_bytes):
            d.clear()

    def memory_record(self, m: int) -> dict:
        return {
            "peak_saved_bytes": self.peak_bytes,
            "stage_peak_saved_bytes": {str(s): b for s, b in self.stage_peak.items() if s >= 0},
            "stage_bytes_per_microbatch": {str(s): b / m for s, b in self.new_bytes.items() if s >= 0},
            "live_after_step": self.live_bytes,  # ~0 unless autograd graphs outlive the step
        }


def pipeline_overrides(schedule: str, pp: int, m: int, v: int | None = None, extra: list[str] | tuple = ()) -> list[str]:
    """Config overrides of one measured pipeline job (tiny model, CPU fp32 unless extra says otherwise)."""
    v = v if v is not None else (1 if schedule in ("gpipe", "1f1b") else 2)
    return [
        "model=tiny", f"parallel.pp={pp}", "parallel.ep=1", "parallel.dp=1", f"schedule={schedule}",
        f"schedule.virtual_stages={v}", f"schedule.microbatches={m}", "train.steps=1000", "logger.progress=none",
        "train.num_threads=1", *extra,
    ]


def _worker(rank: int, world: int, cfgs: dict, opts: dict, out_path: str) -> None:
    import torch.distributed as dist

    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer

    mesh = build_mesh(world, 1, 1)
    trainers, probes, step_no = {}, {}, {}
    for name, cfg in cfgs.items():
        trainers[name] = DistributedTrainer(cfg, mesh)
        probes[name] = Probe(trainers[name])
        step_no[name] = 0

    def step(name: str) -> None:
        trainers[name].train_step(step_no[name])
        step_no[name] += 1

    for name in cfgs:
        for _ in range(opts["warmup"]):
            step(name)
    timing: dict[str, list] = {n: [] for n in cfgs}
    names = list(cfgs)
    for r in range(opts["rounds"]):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotated: drift hits all alike
            for _ in range(opts["steps"]):
                dist.barrier()
                step(name)
                p = probes[name]
                timing[name].append({"span": p.step_span, "events": p.events})
    memory = {}
    if opts["memory"]:
        for name in names:
            p = probes[name]
            p.reset_memory()
            p.memory = True
            dist.barrier()
            step(name)
            p.memory = False
            memory[name] = p.memory_record(cfgs[name].schedule.microbatches)
    mine = {"rank": rank, "timing": timing, "memory": memory, "stages": {n: trainers[n].stage_ids for n in names}}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)


def measure_pipeline(overrides: dict[str, list[str]], pp: int, rounds: int = 3, steps: int = 2, warmup: int = 1,
                     memory: bool = True, timeout: float = 600.0) -> dict[str, dict]:
    """Run every named job (its config overrides) on the same `pp` local gloo processes, one torch
    thread each; return per job: bubble per timed step, busy and makespan, measured action
    durations, the last step's timeline (for Gantt charts), and peak saved bytes per rank."""
    import torch

    from moepipe.config import compose_config
    from moepipe.parallel.spawn import run_distributed

    cfgs = {name: compose_config(ov) for name, ov in overrides.items()}
    opts = {"rounds": rounds, "steps": steps, "warmup": warmup, "memory": memory}
    torch.set_num_threads(1)  # the parent only waits
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ranks.json")
        run_distributed(_worker, pp, cfgs, opts, path, timeout=timeout, threads=1)
        with open(path) as f:
            ranks = json.load(f)
    return {name: summarise(name, ranks, cfgs[name].schedule.microbatches) for name in cfgs}


def summarise(name: str, ranks: list[dict], m: int) -> dict:
    """One job's measurements across ranks (see the module doc for the definitions)."""
    pp = len(ranks)
    n_steps = len(ranks[0]["timing"][name])
    bubbles, makespans, busy = [], [], []
    durations: dict[str, list[float]] = defaultdict(list)
    for i in range(n_steps):
        per_rank = [r["timing"][name][i] for r in ranks]
        t0 = min(x["span"][0] for x in per_rank)
        t1 = max(x["span"][1] for x in per_rank)
        b = [sum(e[4] - e[3] for e in x["events"]) for x in per_rank]
        makespans.append(t1 - t0)
        busy.append(b)
        bubbles.append(1.0 - sum(b) / (pp * (t1 - t0)))
        for x in per_rank:
            for kind, s, _mb, a, e in x["events"]:
                durations[f"{s}{kind}"].append(e - a)
    # Timeline of the median-bubble step (a typical one; single steps can catch a preemption).
    typical = sorted(range(n_steps), key=lambda i: bubbles[i])[n_steps // 2]
    last = [r["timing"][name][typical] for r in ranks]
    t0 = min(x["span"][0] for x in last)
    timeline = [[r["rank"], kind, s, mb, a - t0, e - t0] for r, x in zip(ranks, last) for kind, s, mb, a, e in x["events"]]
    out = {
        "bubble_measured": statistics.median(bubbles),
        "bubble_per_step": bubbles,
        "makespan_s": statistics.median(makespans),
        "busy_s_per_rank": [statistics.median(b[r] for b in busy) for r in range(pp)],
        "action_median_s": {k: statistics.median(v) for k, v in sorted(durations.items())},
        "timeline_typical_step": timeline,
        "typical_step_bubble": bubbles[typical],
        "stages_per_rank": [r["stages"][name] for r in ranks],
    }
    if ranks[0]["memory"]:
        mem = [r["memory"][name] for r in ranks]
        out["peak_saved_bytes_per_rank"] = [x["peak_saved_bytes"] for x in mem]
        out["stage_peak_saved_bytes"] = {k: v for x in mem for k, v in x["stage_peak_saved_bytes"].items()}
        out["stage_bytes_per_microbatch"] = {k: v for x in mem for k, v in x["stage_bytes_per_microbatch"].items()}
        out["live_after_step_per_rank"] = [x["live_after_step"] for x in mem]
        out["peak_inflight_measured"] = {
            s: out["stage_peak_saved_bytes"][s] / b for s, b in out["stage_bytes_per_microbatch"].items() if b > 0
        }
    return out


def replay_bubble(schedule: str, pp: int, v: int, m: int, action_s: dict[str, float]) -> float:
    """The simulator's engine with each (stage, kind) action lasting its measured median and free
    transfers: the bubble that stage imbalance alone explains."""
    from moepipe.sim import schedule_order, simulate_order

    order, s2r = schedule_order(schedule, pp, v, m)
    comp = np.zeros((len(s2r), 3))  # two-chain schedules (chimera) run 2 * pp * v stages
    for s in range(len(s2r)):
        f = action_s.get(f"{s}F", 0.0) + action_s.get(f"{s}loss", 0.0)
        if f"{s}I" in action_s:
            b, w = action_s[f"{s}I"], action_s.get(f"{s}W", 0.0)
        else:
            b, w = action_s.get(f"{s}B", 0.0), 0.0
        comp[s] = (f, b, w)
    res = simulate_order(order, s2r, m, comp)
    return float(1.0 - res.busy.sum() / (pp * res.makespan))


# ---------------------------------------------------------------------------- short training runs


def train_runs(variants: dict[str, list[str]], out_root: str, threads: int = 1) -> dict[str, str]:
    """Train each variant (config overrides) in this process, one after another, each into its own
    run dir under out_root (metrics.jsonl, expert_load.jsonl, summary.json); return the dirs."""
    import torch

    from moepipe.config import compose_config
    from moepipe.train.loop import train

    torch.set_num_threads(threads)
    dirs = {}
    for name, ov in variants.items():
        run_dir = os.path.join(out_root, name)
        # A rerun starts clean: the logger appends to metrics.jsonl, and train.resume=auto would
        # continue from a checkpoint an interrupted earlier run left behind.
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        train(compose_config(ov), run_dir)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s -> {run_dir}", flush=True)
        dirs[name] = run_dir
    return dirs


def read_run(run_dir: str) -> dict:
    """A run's logged rows (metrics.jsonl, step rows only), validation rows and summary.json."""
    from analysis.loadstats import read_jsonl

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    return {"rows": [r for r in rows if r.get("loss") is not None], "val": [r for r in rows if r.get("val_loss") is not None], "summary": summary}
