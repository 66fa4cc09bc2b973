"""Peak memory of a live migration, side by side with a reference revision.

A 2-process CPU job (pp=1 x ep=2, gloo, fp32, 8 experts of 2.6M parameters in each of 4 MoE
blocks) trains two steps, so that AdamW state exists, then migrates to a plan that moves one
expert per block to the other rank and replicates another one: most of each rank's state stays
where it is, as in a typical re-placement. Per rank it records the state it holds
(parameters + both AdamW moments), resident memory just before `migrate`, the largest resident
memory sampled during it (every 0.2 ms from a thread), and the process's lifetime high-water
mark (ru_maxrss) before and after: the growth of that mark is the memory a job must provision
for migrations beyond what training itself needs.

The same worker runs twice, each in its own subprocess: on this checkout and on `--ref` (a git
revision, checked out to a temporary worktree; default the commit before migrations adopted
kept tensors, when the new stages were built and filled by copy).

    .venv/bin/python experiments/bench_migration_memory.py [--ref REV]
    .venv/bin/python experiments/bench_migration_memory.py --quick --out /tmp/x.json   # d_model 64, 2 blocks

Writes results/bench_migration_memory.json and prints `peak_growth_ratio_vs_ref=` last
(sampled peak growth during the migration, this checkout / reference, mean over ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("MOEPIPE_SRC", ROOT))  # the worker imports the revision under test
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # fig_common: this checkout's, whichever revision runs

DEFAULT_REF = "43b697b"  # last commit whose migrate() built new stages and copied state into them
OVERRIDES = [
    "parallel.pp=1", "parallel.ep=2", "parallel.dp=1", "schedule=1f1b", "schedule.microbatches=1",
    "model=tiny", "model.n_layers=4", "model.d_model=512", "model.n_heads=8", "model.ffn_hidden=1024", "model.max_seq_len=32",
    "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=1728", "moe.capacity_factor=0",
    "train.seq_len=32", "train.batch_size=4", "train.dtype=fp32", "train.device=cpu", "train.num_threads=1", "train.eval_every=0",
    "placer.name=static", "placer.interval=0", "placer.replica_slots=1", "logger=none", "logger.progress=none",
]


# --quick: the same job on a model of a few MB (2 blocks, d_model 64, 8 experts of 64 hidden)
QUICK = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.ffn_hidden=128", "moe.expert_hidden=64",
         "train.batch_size=2", "train.seq_len=16", "model.max_seq_len=16"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Largest resident memory seen while the `with` block runs."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def target_plan(plan):
    """Each MoE block: expert 0 moves from EP rank 0 to 1, expert 4 gains a copy on rank 0."""
    from moepipe.placement.plan import Plan

    em = {l: [list(r) for r in m] for l, m in plan.expert_map.items()}
    for m in em.values():
        m[0], m[4] = [1], [0, 1]
    return Plan(list(plan.stage_layers), list(plan.stage_to_pp_rank), em, plan.pp, plan.ep, plan.dp)


def worker(rank: int, world: int, out_path: str, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from moepipe.config import compose_config
    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer, release_freed_memory

    cfg = compose_config(overrides)
    trainer = DistributedTrainer(cfg, build_mesh(1, 2, 1))
    for step in range(2):
        trainer.train_step(step)
    state = sum(t.numel() * t.element_size() for ts in trainer._entries().values() for t in ts[:3])
    release_freed_memory()
    dist.barrier()
    hw0, before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_bytes()
    with PeakSampler() as s:
        event = trainer.migrate(target_plan(trainer.plan))
    hw1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = trainer.train_step(2).loss  # the job goes on after the move
    row = {"rank": rank, "state_mb": state / 2**20, "rss_before_mb": before / 2**20, "peak_during_mb": s.peak / 2**20,
           "peak_growth_mb": (s.peak - before) / 2**20, "peak_growth_over_state": (s.peak - before) / state,
           "high_water_growth_mb": (hw1 - hw0) / 2**20, "bytes_moved": event["bytes_moved"], "migration_s": event["migration_s"],
           "loss_after": loss}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    torch.set_num_threads(1)


def run_variant(src: str, out_path: str, quick: bool) -> list[dict]:
    env = dict(os.environ, MOEPIPE_SRC=src, PYTHONPATH=src)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", out_path] + (["--quick"] if quick else [])
    subprocess.run(cmd, env=env, cwd=src, check=True, timeout=600)
    with open(out_path) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default=DEFAULT_REF, help="git revision to compare with")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    import fig_common as fc

    sys.path.insert(0, os.environ.get("MOEPIPE_SRC", ROOT))  # fig_common put this checkout first; the worker runs MOEPIPE_SRC's moepipe
    fc.add_output_args(ap, os.path.join(ROOT, "results", "bench_migration_memory.json"))
    args = ap.parse_args()
    overrides = OVERRIDES + (QUICK if args.quick else [])
    if args.worker:
        from moepipe.parallel.spawn import run_distributed

        run_distributed(worker, 2, args.worker, overrides, timeout=500)
        return
    args.out = fc.check_output(args)
    prov = fc.provenance(args, overrides, seed=0)

    from moepipe.train.metrics import write_json

    rev = subprocess.run(["git", "rev-parse", args.ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ref_src = os.path.join(tmp, "ref")
        subprocess.run(["git", "worktree", "add", "--detach", ref_src, rev], cwd=ROOT, capture_output=True, check=True)
        try:
            for name, src in (("this", ROOT), ("ref", ref_src)):
                results[name] = run_variant(src, os.path.join(tmp, f"{name}.json"), args.quick)
                for r in results[name]:
                    print(f"{name:<4} rank {r['rank']}: state {r['state_mb']:.0f} MB, RSS before {r['rss_before_mb']:.0f} MB, "
                          f"peak growth during migrate {r['peak_growth_mb']:.0f} MB ({r['peak_growth_over_state']:.2f}x state), "
                          f"high-water growth {r['high_water_growth_mb']:.0f} MB, moved {r['bytes_moved'] / 2**20:.0f} MB "
                          f"in {r['migration_s']:.2f} s, loss after {r['loss_after']:.4f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", ref_src], cwd=ROOT, capture_output=True)
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    ratio = mean(results["this"], "peak_growth_mb") / max(mean(results["ref"], "peak_growth_mb"), 1e-9)
    same_loss = all(abs(a["loss_after"] - b["loss_after"]) <= 1e-5 * abs(b["loss_after"]) for a, b in zip(results["this"], results["ref"]))
    out = {"peak_growth_ratio_vs_ref": ratio, "ref": rev, "same_loss_after_migration": same_loss, "variants": results,
           "overrides": overrides, "provenance": prov}
    write_json(args.out, out)
    print(f"same_loss_after_migration={same_loss}")
    print(f"peak_growth_ratio_vs_ref={ratio:.3f}")


if __name__ == "__main__":
    main()
