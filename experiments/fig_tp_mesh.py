"""Figure: predicted throughput of a Mixtral-shaped model on ib_16x8 (16 nodes x 8 H100, 128 GPUs)
for every (tp, pp, ep, dp) mesh the search considers (issue 17), the chosen one marked.

Simulation only (moepipe.placement.mesh_search.search_mesh, the same function as
`moepipe-sim sim.search_mesh=true`): tp in {1, 2, 4, 8} inside a node, pp dividing the 32
layers, ep dividing the 8 experts, dp = 128 / (tp pp ep); each shape is validated as a job
(schedule, batch divisibility), checked for memory per GPU (parameters + AdamW + the
schedule's activation peak <= 80 GB) and simulated with the static plan under 1F1B. Job:
global batch 512 x 4096 tokens, 32 microbatches, bf16, uniform routing, sim.efficiency 0.5.
TP model (moepipe/placement/tensor_parallel_cost.py): compute / tp, two activation
all-reduces per block forward and two backward on NVLink with no overlap, dense weights and
their AdamW state / tp, routed experts whole on every GPU of the group.

    .venv/bin/python experiments/fig_tp_mesh.py                 # ~5 s, writes results/fig_tp_mesh.json, figures/fig_tp_mesh.png
    .venv/bin/python experiments/fig_tp_mesh.py --quick --out /tmp/x/fig_tp_mesh.json   # model=small on 8 GPUs (tests)

Prints the table of the best meshes, then `chosen_mesh_tokens_per_s=tp<a>xpp<b>xep<c>xdp<d>:<tokens/s>` last.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import fig_common as fc  # noqa: E402

from moepipe.config import compose_config  # noqa: E402
from moepipe.placement.mesh_search import format_table, search_mesh  # noqa: E402
from moepipe.placement.topology import from_config  # noqa: E402

JOB = ["model=mixtral_8x7b", "topology=ib_16x8", "schedule=1f1b", "schedule.microbatches=32", "train.batch_size=512",
       "train.seq_len=4096", "train.dtype=bf16", "placer=static"]
QUICK = ["model=small", "topology=nvlink_8gpu", "schedule=1f1b", "schedule.microbatches=4", "train.batch_size=32",
         "train.seq_len=256", "train.dtype=bf16", "placer=static"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", nargs="*", default=[], help="more config overrides (e.g. train.activation_checkpointing=true)")
    ap.add_argument("--top", type=int, default=10, help="rows of the printed table")
    ap.add_argument("--microbatch-seqs", type=int, default=None,
                    help="keep this many sequences per microbatch (microbatches = batch / (ep dp seqs)) instead of a fixed count")
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "fig_tp_mesh.json"))
    args = ap.parse_args()
    args.out = fc.check_output(args)
    overrides = (QUICK if args.quick else JOB) + list(args.extra)
    cfg = compose_config(["parallel=single"] + overrides)
    topo = from_config(cfg.topology)
    t0 = time.perf_counter()
    s = search_mesh(cfg, topo, microbatch_seqs=args.microbatch_seqs)
    dt = time.perf_counter() - t0
    best = s.best
    rows = []
    for r in s.feasible + s.rejected:
        row = asdict(r) | {"label": r.label, "chosen": r is best}
        row["kind"] = "feasible" if r.feasible else ("memory" if "GB per GPU" in r.reason else "config")
        rows.append(row)
    rows.sort(key=lambda x: (x["tp"], x["pp"], x["ep"]))
    by_tp = {}
    for r in s.feasible:  # fastest first: the first of each tp is that tp's best
        by_tp.setdefault(r.tp, asdict(r))
    payload = {
        "model": cfg.model.name, "topology": topo.name, "gpus": s.gpus, "schedule": s.schedule, "microbatches": s.microbatches,
        "microbatch_seqs": s.microbatch_seqs, "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len, "tokens_per_step": s.tokens_per_step, "placer": s.placer,
        "memory_capacity_gb": topo.devices[0].memory_bytes / 1e9, "search_time_s": dt,
        "chosen": None if best is None else asdict(best), "best_by_tp": {str(k): v for k, v in sorted(by_tp.items())},
        "n_considered": len(rows), "n_feasible": len(s.feasible),
        "speedup_chosen_vs_best_tp1": (best.tokens_per_s / by_tp[1]["tokens_per_s"]) if best is not None and 1 in by_tp else None,
        "assumptions": [
            "analytic cost model at sim.efficiency of the devices' sustained bf16 FLOP/s; uniform routing",
            "TP: compute / tp; 2 activation all-reduces per block forward and 2 backward on the TP group's NVLink ring, not overlapped",
            "TP: dense weights, grads and AdamW state / tp (embedding and head split by vocabulary); routed experts whole on every GPU of the group",
            "TP: the experts' (and norms', router's) gradients all-reduced over the TP ring once per step",
            "no sequence parallelism (parallel.sp): norms' activations replicated over the TP group",
            "memory per GPU: parameters + grads + AdamW (16 bytes/parameter) + the schedule's activation peak; no allocator slack",
        ],
        "provenance": fc.provenance(args, overrides, seed=0),
    }
    path, figs = fc.save_and_draw("fig_tp_mesh", payload, rows, args)
    print(format_table(s, args.top))
    print(f"{len(rows)} meshes considered, {len(s.feasible)} feasible; search {dt:.2f} s; {path}; figures {figs}")
    if best is None:
        fc.headline("chosen_mesh_tokens_per_s", "none")
    else:
        fc.headline("chosen_mesh_tokens_per_s", f"tp{best.tp}xpp{best.pp}xep{best.ep}xdp{best.dp}:{best.tokens_per_s:.6g}")


if __name__ == "__main__":
    main()
