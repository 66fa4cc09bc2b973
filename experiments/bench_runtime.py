"""Runtime overhead of moepipe's pipeline-parallel training step (issue 3).

Tokens/s of one training step of the `tiny` model (1F1B, 8 microbatches, fp32, CPU) for:
- single:  the single-process `Trainer` (one process, 1 and 2 torch threads, alternated);
- moepipe: `DistributedTrainer.train_step` at pp=2, ep=1, dp=1 (2 gloo processes, 1 thread each);
- bare:    the same stage modules (`build_stage_module` on the same static plan, same seed, so the
           same weights and arithmetic) in a hand-written torch.distributed.pipelining loop:
           `PipelineStage` + `Schedule1F1B` with the same loss, a plain AdamW and a local
           `clip_grad_norm_`; nothing else.
Both pipelined variants live in the same two processes and are measured alternately (which one
goes first flips every round), so background load on the shared cores hits both alike; each
round is K steps timed between barriers, its time the slower rank's; the median round counts.
After the timed rounds a few extra steps run with per-section timers (not in the headline).

By default optim.lr=1e-12: every fp32 weight update rounds away, so all variants run identical
math (same routing, same expert GEMM shapes) at every step and the per-step losses of moepipe and
bare must agree (checked). With a real lr the two would drift apart (moepipe's warmup schedule
and global-norm clipping vs bare's constant lr and per-stage clipping), and different routing
alone moved the first stage's CPU time per step by ~10%, which is not runtime overhead.
Also reported: CPU seconds per step summed over both ranks (robust to other processes on the
cores, which inflate wall time), and moepipe's gradient bookkeeping timed in isolation.

    .venv/bin/python experiments/bench_runtime.py                  # writes results/bench_runtime.json
    .venv/bin/python experiments/bench_runtime.py --rounds 9 --steps 4
    .venv/bin/python experiments/bench_runtime.py --quick --out /tmp/x.json   # test-sized (~20 s)

The last line printed is `overhead_vs_bare=<bare tokens/s / moepipe tokens/s>` (1.00 = none).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

# Sleeping OpenMP waiters (see bench_moe_layer.py): spin-waiting threads collapse when another
# process holds one of the two cores. Only the 2-thread single run has OpenMP teams at all.
if "--omp-default" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fig_common as fc  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moepipe.parallel.spawn import run_distributed  # noqa: E402
from moepipe.train.metrics import write_json  # noqa: E402

BASE_OVERRIDES = [
    "model=tiny", "schedule=1f1b", "train.seq_len=128", "train.dtype=fp32", "train.device=cpu",
    "train.steps=1000", "logger.progress=none",
]


from moepipe.config import compose_config as compose  # noqa: E402


class Sections:
    """Accumulated wall and calling-thread CPU time per named section (wrap callables with `wrap`).
    CPU time leaves out waiting (for the peer rank, or for a core other processes hold)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t0
                self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c0

        return timed

    def per_step_ms(self, steps: int) -> dict[str, dict[str, float]]:
        return {k: {"wall": 1e3 * self.wall[k] / steps, "cpu": 1e3 * self.cpu[k] / steps} for k in self.wall}


# ---------------------------------------------------------------------------- bare pipeline


class BarePipeline:
    """This rank's stage in a plain torch.distributed.pipelining loop: no moepipe bookkeeping."""

    def __init__(self, cfg, plan, rank: int, corpus, sections: Sections | None = None):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B

        from moepipe.data import train_batch
        from moepipe.model import lm_loss
        from moepipe.parallel.stage_builder import build_stage_module
        from moepipe.train.optim import build_optimizer

        self.cfg, self.corpus = cfg, corpus
        (stage,) = plan.stages_of_rank(rank)
        n, m = plan.n_stages, cfg.schedule.microbatches
        device = torch.device("cpu")
        self.module = build_stage_module(cfg.model, cfg.moe, plan, stage, 0, device, cfg.train.seed)
        self.module.train()
        self.module.set_aux_loss_scale(1.0 / m)
        b, t, d = cfg.train.batch_size // m, cfg.train.seq_len, cfg.model.d_model
        inp = torch.empty(b, t, dtype=torch.long, device="meta") if stage == 0 else torch.empty(b, t, d, device="meta", requires_grad=True)
        self.first, self.last = stage == 0, stage == n - 1
        out = torch.empty(b, t, cfg.model.vocab_size, device="meta", requires_grad=True) if self.last else torch.empty(b, t, d, device="meta", requires_grad=True)
        pstage = PipelineStage(self.module, stage, n, device, input_args=(inp,), output_args=(out,))  # default (world) group
        self.schedule = Schedule1F1B(pstage, m, loss_fn=lambda o, y: lm_loss(o, y) / m, scale_grads=False)
        # Same parameter groups (decay on matrices only) and hyper-parameters as moepipe, constant lr.
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.params = list(self.module.parameters())
        self._train_batch = train_batch
        self._clip = torch.nn.utils.clip_grad_norm_
        if sections is not None:
            self.instrument(sections)

    def instrument(self, s: Sections) -> None:
        self._train_batch = s.wrap("train_batch", self._train_batch)
        self.schedule.step = s.wrap("schedule.step", self.schedule.step)
        self._clip = s.wrap("clip_grad_norm_", self._clip)
        self.optimizer.step = s.wrap("optimizer.step", self.optimizer.step)
        self.train_step = s.wrap("train_step(total)", self.train_step)

    def train_step(self, step: int) -> float | None:
        t = self.cfg.train
        x, y = self._train_batch(self.corpus, step, t.seed, t.batch_size, t.seq_len)
        self.optimizer.zero_grad(set_to_none=True)
        # Fresh per-step routing counters, as DistributedTrainer does: the module was built under
        # torch.device("meta"), so its RoutingStats start as meta tensors that a forward cannot add to.
        self.module.reset_routing_stats()
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.step(x)
        else:
            self.schedule.step(target=y, losses=losses)
        self._clip(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        return sum(float(l.detach()) for l in losses) if self.last else None


# Module-level functions DistributedTrainer.train_step calls, by the module whose globals the
# call looks them up in (routing_metrics lives in moepipe.train.metrics; StepResult.from_stats in
# moepipe.train.loop calls it through loop's own import).
TIMED_FUNCTIONS = {
    "moepipe.train.distributed": ("train_batch", "sync_gradients", "global_grad_norm", "clip_gradients"),
    "moepipe.train.loop": ("routing_metrics",),
}


def instrument_moepipe(trainer, s: Sections) -> None:
    """Per-section timers around what DistributedTrainer.train_step calls (instance / module level)."""
    import importlib

    for mod_name, names in TIMED_FUNCTIONS.items():
        mod = importlib.import_module(mod_name)
        for name in names:
            if not callable(getattr(mod, name, None)):
                raise AttributeError(f"bench_runtime: {mod_name}.{name} is gone: update TIMED_FUNCTIONS")
            setattr(mod, name, s.wrap(name, getattr(mod, name)))
    trainer.schedule.step = s.wrap("schedule.step", trainer.schedule.step)
    trainer._run = s.wrap("_run (schedule.step + slicing + loss all_reduce)", trainer._run)
    trainer.optimizer.step = s.wrap("optimizer.step", trainer.optimizer.step)
    trainer._global_routing_stats = s.wrap("_global_routing_stats (all_reduce)", trainer._global_routing_stats)
    trainer.train_step = s.wrap("train_step(total)", trainer.train_step)


# ---------------------------------------------------------------------------- worker


def worker(rank: int, world: int, cfg, args, out_path: str) -> None:
    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer

    mesh = build_mesh(cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.dp)
    trainer = DistributedTrainer(cfg, mesh)
    bare = BarePipeline(cfg, trainer.plan, mesh.pp_rank, trainer.corpus)

    # Same initial weights, parameter by parameter (names are global in both).
    mine = dict(next(iter(trainer.modules.values())).named_parameters())
    theirs = dict(bare.module.named_parameters())
    same_weights = set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)

    variants = {"moepipe": lambda s: trainer.train_step(s).loss, "bare": bare.train_step}
    next_step = {"moepipe": 0, "bare": 0}
    losses: dict[str, list] = {"moepipe": [], "bare": []}

    def run(name: str) -> float | None:
        out = variants[name](next_step[name])
        next_step[name] += 1
        losses[name].append(out)
        return out

    # Step 0 on fresh weights and the same batch: the losses must agree.
    loss0 = {"moepipe": run("moepipe"), "bare": run("bare")}
    for i in range(args.warmup - 1):
        for name in (("moepipe", "bare") if i % 2 == 0 else ("bare", "moepipe")):
            run(name)

    rounds: dict[str, list[float]] = {"moepipe": [], "bare": []}
    cpu: dict[str, list[float]] = {"moepipe": [], "bare": []}  # this process's CPU time (all its threads)
    for r in range(args.rounds):
        for name in (("moepipe", "bare") if r % 2 == 0 else ("bare", "moepipe")):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                run(name)
            rounds[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    # Section breakdown on extra steps (timers installed only now).
    secs = {"moepipe": Sections(), "bare": Sections()}
    instrument_moepipe(trainer, secs["moepipe"])
    bare.instrument(secs["bare"])
    variants = {"moepipe": lambda s: trainer.train_step(s).loss, "bare": bare.train_step}
    for i in range(args.breakdown_steps):
        for name in (("moepipe", "bare") if i % 2 == 0 else ("bare", "moepipe")):
            dist.barrier()
            run(name)

    # moepipe's per-step gradient bookkeeping alone, on this rank's real gradients, against the
    # foreach norm bare torch uses (median of 30; global_grad_norm's all_reduce runs in lockstep).
    from moepipe.parallel import grad_sync as G

    def med_ms(fn, n: int = 30) -> float:
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    grads = [p.grad for p in trainer.dense + trainer.expert]
    dist.barrier()
    isolated = {
        "sync_gradients": med_ms(lambda: G.sync_gradients(trainer.dense, trainer.expert, mesh)),
        "global_grad_norm": med_ms(lambda: G.global_grad_norm(trainer.dense, trainer.expert, mesh)),
        "foreach_total_norm(get_total_norm)": med_ms(lambda: torch.nn.utils.get_total_norm(grads)),
        "world_all_reduce_scalar": med_ms(lambda: dist.all_reduce(torch.zeros((), dtype=torch.float64))),
    }

    mine = {
        "rank": rank, "isolated_ms": isolated, "stage_layers": list(trainer.plan.stage_layers[mesh.pp_rank]), "same_initial_weights": same_weights,
        "loss0": loss0, "losses": losses, "round_s": rounds, "round_cpu_s": cpu, "threads": torch.get_num_threads(),
        "sections_ms": {k: v.per_step_ms(max(1, args.breakdown_steps)) for k, v in secs.items()},
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)


# ---------------------------------------------------------------------------- single process


def bench_single(cfg, args) -> dict[int, list[float]]:
    from moepipe.train.loop import Trainer

    trainer = Trainer(cfg)
    step = 0
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(2):
            trainer.train_step(step)
            step += 1
    rounds: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for threads in ((1, 2) if r % 2 == 0 else (2, 1)):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(step)
                step += 1
            rounds[threads].append(time.perf_counter() - t0)
    return rounds


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: the benchmark wants its 2 processes alone on 2 cores."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed round (K)")
    ap.add_argument("--rounds", type=int, default=12, help="timed rounds per variant (R)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (step 0 is the loss check)")
    ap.add_argument("--breakdown-steps", type=int, default=4, help="extra steps per variant with section timers")
    ap.add_argument("--lr", type=float, default=1e-12,
                    help="optim.lr; the default 1e-12 leaves every fp32 weight unchanged (updates round away), so all "
                         "variants do identical math (same routing) at every step; the optimizer still does all its work")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--skip-single", action="store_true")
    ap.add_argument("--omp-default", action="store_true", help="keep OpenMP's default wait policy")
    fc.add_output_args(ap, os.path.join(ROOT, "results", "bench_runtime.json"))
    args = ap.parse_args()
    if args.quick:  # the same path on the smallest sizes: 1 round of 1 step, batch 4 in 2 microbatches
        args.rounds, args.steps, args.warmup, args.breakdown_steps, args.batch_size, args.microbatches = 1, 1, 1, 1, 4, 2
    args.out = fc.check_output(args)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (step 0 is the loss check)")

    overrides = BASE_OVERRIDES + (["train.seq_len=32"] if args.quick else [])
    overrides = overrides + [f"schedule.microbatches={args.microbatches}", f"train.batch_size={args.batch_size}", f"optim.lr={args.lr:g}"]
    pp_overrides = overrides + ["parallel=pp2"]
    cfg_single = compose(overrides + ["parallel=single"])
    cfg_pp = compose(pp_overrides)
    tokens = args.batch_size * cfg_pp.train.seq_len
    info = fc.provenance(args, {"single": overrides + ["parallel=single"], "pp2": overrides + ["parallel=pp2"]})  # before any thread change
    t_start = time.perf_counter()
    load_before = _loadavg()

    single = {} if args.skip_single else bench_single(cfg_single, args)
    torch.set_num_threads(1)  # the parent idles while the workers run

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ranks.json")
        run_distributed(worker, cfg_pp.parallel.pp, cfg_pp, args, path, timeout=900.0)
        with open(path) as f:
            ranks = json.load(f)

    def tps(times: list[float]) -> float:
        return args.steps * tokens / statistics.median(times)

    # A round's time is the slower rank's (both ranks time the same K steps between barriers).
    pp_rounds = {v: [max(r["round_s"][v][i] for r in ranks) for i in range(args.rounds)] for v in ("moepipe", "bare")}
    # CPU seconds per step summed over ranks: the work each variant does, less sensitive than wall
    # time to other processes on the cores (waiting in gloo sleeps; it does not count).
    cpu_per_step = {v: statistics.median(sum(r["round_cpu_s"][v][i] for r in ranks) for i in range(args.rounds)) / args.steps
                    for v in ("moepipe", "bare")}
    rows = {f"single_{k}thread": {"tokens_per_s": tps(v), "round_s": v} for k, v in single.items()}
    for v, times in pp_rounds.items():
        rows[f"{v}_pp2"] = {"tokens_per_s": tps(times), "round_s": times}
    moe_tps, bare_tps = rows["moepipe_pp2"]["tokens_per_s"], rows["bare_pp2"]["tokens_per_s"]
    overhead = bare_tps / moe_tps
    # Paired per-round ratios (same round, adjacent in time) as a noise check on the medians.
    paired = [m / b for m, b in zip(pp_rounds["moepipe"], pp_rounds["bare"])]
    last = next(r for r in ranks if r["loss0"]["bare"] is not None)
    loss0 = {"moepipe": last["loss0"]["moepipe"], "bare": last["loss0"]["bare"]}
    # Both variants train on the same batch at the same step index; with frozen weights (the
    # default lr) every step's loss must match, not only step 0's.
    n_common = min(len(last["losses"]["moepipe"]), len(last["losses"]["bare"]))
    loss_diff_all = max(abs(a - b) for a, b in zip(last["losses"]["moepipe"][:n_common], last["losses"]["bare"][:n_common]))
    speedups = {}
    if single:
        base = rows["single_1thread"]["tokens_per_s"]
        speedups = {k: r["tokens_per_s"] / base for k, r in rows.items() if k != "single_1thread"}

    result = {
        "overhead_vs_bare": overhead,
        "overhead_paired_median": statistics.median(paired),
        # Fastest round of each: the least disturbed by other processes on the shared cores.
        "overhead_best_rounds": min(pp_rounds["moepipe"]) / min(pp_rounds["bare"]),
        "tokens_per_s": {k: r["tokens_per_s"] for k, r in rows.items()},
        "speedup_vs_single_1thread": speedups,
        "cpu_s_per_step_all_ranks": cpu_per_step,
        "cpu_overhead_vs_bare": cpu_per_step["moepipe"] / cpu_per_step["bare"],
        "loss_step0": {**loss0, "abs_diff": abs(loss0["moepipe"] - loss0["bare"])},
        "loss_max_abs_diff_all_steps": {"steps": n_common, "max_abs_diff": loss_diff_all, "lr": args.lr},
        "same_initial_weights": all(r["same_initial_weights"] for r in ranks),
        "rows": rows,
        "sections_ms_per_step": {f"rank{r['rank']}": r["sections_ms"] for r in ranks},
        "stage_layers": {f"rank{r['rank']}": r["stage_layers"] for r in ranks},
        "isolated_bookkeeping_ms": {f"rank{r['rank']}": r["isolated_ms"] for r in ranks},
        "method": {
            "tokens_per_step": tokens, "steps_per_round": args.steps, "rounds": args.rounds, "warmup": args.warmup,
            "breakdown_steps": args.breakdown_steps, "statistic": "median round; pp round time = slower rank",
            "alternation": "variant order flips every round", "pp_threads_per_rank": 1,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "config_overrides": {"single": overrides + ["parallel=single"], "pp2": pp_overrides},
        "wall_s": time.perf_counter() - t_start,
        "loadavg_before_after": [load_before, _loadavg()],
        "provenance": info,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, result)

    print(f"{'variant':<16} {'tokens/s':>10} {'vs single 1t':>13}")
    for k, r in rows.items():
        sp = speedups.get(k, 1.0 if k == "single_1thread" else float("nan"))
        print(f"{k:<16} {r['tokens_per_s']:>10.0f} {sp:>12.2f}x")
    print(f"loss at step 0: moepipe {loss0['moepipe']:.6f}  bare {loss0['bare']:.6f}  |diff| {result['loss_step0']['abs_diff']:.2e}  "
          f"same initial weights: {result['same_initial_weights']}; max |diff| over all {n_common} steps {loss_diff_all:.2e} (lr {args.lr:g})")
    print(f"paired per-round ratio (median): {result['overhead_paired_median']:.3f}; best rounds: {result['overhead_best_rounds']:.3f}; CPU s/step (both ranks) moepipe "
          f"{cpu_per_step['moepipe']:.3f} bare {cpu_per_step['bare']:.3f} -> cpu_overhead {result['cpu_overhead_vs_bare']:.3f}; "
          f"loadavg before {load_before} after {result['loadavg_before_after'][1]}")
    print("sections, ms per step (wall/thread-CPU):")
    for rk, secs in result["sections_ms_per_step"].items():
        for v, s in secs.items():
            print(f"{rk} {v:<8} " + ", ".join(f"{n}={ms['wall']:.1f}/{ms['cpu']:.1f}" for n, ms in sorted(s.items(), key=lambda kv: -kv[1]["wall"])))
    for rk, iso in result["isolated_bookkeeping_ms"].items():
        print(f"{rk} isolated " + ", ".join(f"{n}={ms:.2f}ms" for n, ms in iso.items()))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    print(f"overhead_vs_bare={overhead:.3f}")


if __name__ == "__main__":
    main()
