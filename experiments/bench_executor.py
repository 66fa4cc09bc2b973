"""moepipe's schedule executor against torch's schedule runtime, side by side: step time and
per-action cost for 1F1B, interleaved 1F1B and ZBV on 2 gloo ranks (CPU).

The stages are tiny (one d x d linear layer each, a few microseconds of compute per action),
so a step's time is mostly each runtime's own per-action work: bookkeeping, posting and
completing the point-to-point messages, waiting for the peer. Both runtimes get the same
modules, the same PipelineStage set-up (static shapes) and the same microbatches; variants
alternate within every round (order flipped each round) and a round's time is the slower
rank's. The per-action cost is the step time divided by the compute actions a rank runs per
step. Before timing, one step of each variant is checked to give bit-identical losses and
gradients (the executor runs torch's own order with torch's own stage compute).

Headline: the worst ratio over the schedules of the executor's median step time to torch's
(<= 1: no larger per-action overhead than torch's).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fig_common as fc  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moepipe.parallel.spawn import run_distributed  # noqa: E402
from moepipe.train.metrics import write_json  # noqa: E402

SCHEDULES = [("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2)]


def _stages(modules: dict, n_stages: int, b: int, d: int, group):
    from torch.distributed.pipelining import PipelineStage

    def meta():
        return torch.empty(b, d, device="meta", requires_grad=True)

    return [PipelineStage(mod, s, n_stages, torch.device("cpu"), input_args=(torch.empty(b, d, device="meta") if s == 0 else meta(),),
                          output_args=(meta(),), group=group) for s, mod in sorted(modules.items())]


def _build(variant: str, name: str, v: int, modules: dict, m: int, b: int, d: int):
    from moepipe.parallel.executor import ScheduleExecutor
    from moepipe.parallel.pipeline import schedule_class
    from moepipe.sim.schedules import schedule_program

    pp, rank = dist.get_world_size(), dist.get_rank()
    stages = _stages(modules, pp * v, b, d, None)
    loss_fn = lambda out, y: ((out - y) ** 2).mean() / m  # noqa: E731
    if variant == "moepipe":
        prog = schedule_program(name, pp, v, m)
        return ScheduleExecutor({st.stage_index: st for st in stages}, prog, rank, loss_fn), prog
    cls, multi = schedule_class(name)
    sched = cls(stages if multi else stages[0], m, loss_fn=loss_fn, scale_grads=False)
    return sched, schedule_program(name, pp, v, m)


def worker(rank: int, world: int, args, out_path: str) -> None:
    from moepipe.placement.plan import stage_assignment
    from moepipe.sim.schedules import plan_style

    torch.manual_seed(0)
    m, b, d = args.microbatches, args.microbatch_size, args.width
    x = torch.randn(m * b, d)
    y = torch.randn(m * b, d)
    out = {"rank": rank, "schedules": {}}
    for name, v in SCHEDULES:
        where = stage_assignment(world, v, plan_style(name))
        torch.manual_seed(1)
        all_mods = {s: torch.nn.Linear(d, d) for s in range(world * v)}  # same weights on every rank
        modules = {s: mod for s, mod in all_mods.items() if where[s] == rank}
        holds_first, holds_last = 0 in modules, world * v - 1 in modules
        runs = {var: _build(var, name, v, modules, m, b, d) for var in ("torch", "moepipe")}

        def step(var: str) -> list:
            for mod in modules.values():
                mod.zero_grad(set_to_none=True)
            losses: list = []
            runs[var][0].step(*((x,) if holds_first else ()), **({"target": y, "losses": losses} if holds_last else {}))
            return losses

        check = {}
        for var in ("torch", "moepipe"):
            losses = step(var)
            check[var] = ([float(t.detach()) for t in losses], [p.grad.clone() for mod in modules.values() for p in mod.parameters()])
        same = check["torch"][0] == check["moepipe"][0] and all(torch.equal(a, c) for a, c in zip(check["torch"][1], check["moepipe"][1]))
        for _ in range(args.warmup):
            for var in ("torch", "moepipe"):
                step(var)
        rounds = {"torch": [], "moepipe": []}
        cpu = {"torch": [], "moepipe": []}
        for i in range(args.rounds):
            for var in (("torch", "moepipe") if i % 2 == 0 else ("moepipe", "torch")):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(args.steps):
                    step(var)
                rounds[var].append((time.perf_counter() - t0) / args.steps)
                cpu[var].append((time.thread_time() - c0) / args.steps)
        prog = runs["moepipe"][1]
        compute = len(prog.compute_order()[rank])
        out["schedules"][name] = {"step_s": rounds, "cpu_s": cpu, "same_losses_and_grads": same,
                                  "compute_actions": compute, "all_actions": len(prog.actions[rank])}
    with open(out_path + f".{rank}", "w") as f:
        json.dump(out, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--microbatches", type=int, default=16)
    ap.add_argument("--microbatch-size", type=int, default=4)
    ap.add_argument("--width", type=int, default=16, help="d of each stage's d x d linear layer")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds per variant (alternating)")
    ap.add_argument("--warmup", type=int, default=3)
    fc.add_output_args(ap, os.path.join(fc.RESULTS, "bench_executor.json"))
    args = ap.parse_args()
    if args.quick:
        args.microbatches, args.steps, args.rounds, args.warmup = 4, 2, 2, 1
    args.out = fc.check_output(args)
    info = fc.provenance(args)
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ranks")
        run_distributed(worker, 2, args, path, timeout=600.0)
        ranks = [json.load(open(f"{path}.{r}")) for r in range(2)]
    rows, table = [], {}
    for name, _ in SCHEDULES:
        per = {}
        for var in ("torch", "moepipe"):
            step = [max(r["schedules"][name]["step_s"][var][i] for r in ranks) for i in range(args.rounds)]
            cpu = statistics.median(sum(r["schedules"][name]["cpu_s"][var][i] for r in ranks) for i in range(args.rounds))
            n = max(r["schedules"][name]["compute_actions"] for r in ranks)
            per[var] = {"step_ms": 1e3 * statistics.median(step), "best_step_ms": 1e3 * min(step), "cpu_ms_all_ranks": 1e3 * cpu,
                        "us_per_compute_action": 1e6 * statistics.median(step) / n, "compute_actions_per_rank": n}
            rows.append({"schedule": name, "runtime": var, **per[var]})
        same = all(r["schedules"][name]["same_losses_and_grads"] for r in ranks)
        table[name] = {**per, "ratio_moepipe_vs_torch": per["moepipe"]["step_ms"] / per["torch"]["step_ms"],
                       "cpu_ratio_moepipe_vs_torch": per["moepipe"]["cpu_ms_all_ranks"] / per["torch"]["cpu_ms_all_ranks"],
                       "bitwise_equal_losses_and_grads": same}
    worst = max(t["ratio_moepipe_vs_torch"] for t in table.values())
    result = {"headline": {"worst_step_time_ratio_moepipe_vs_torch": worst}, "schedules": table,
              "method": {"ranks": 2, "microbatches": args.microbatches, "microbatch_size": args.microbatch_size, "width": args.width,
                         "steps_per_round": args.steps, "rounds": args.rounds, "warmup": args.warmup, "threads_per_rank": 1,
                         "statistic": "median over rounds of the slower rank's mean step time; variants alternate within rounds"},
              "raw": ranks, "wall_s": time.perf_counter() - t_start, "provenance": info}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, result)
    print(f"{'schedule':<18} {'runtime':<8} {'step ms':>8} {'best ms':>8} {'us/action':>10} {'CPU ms':>8}")
    for r in rows:
        print(f"{r['schedule']:<18} {r['runtime']:<8} {r['step_ms']:>8.3f} {r['best_step_ms']:>8.3f} {r['us_per_compute_action']:>10.1f} "
              f"{r['cpu_ms_all_ranks']:>8.3f}")
    for name, t in table.items():
        print(f"{name}: moepipe/torch step time {t['ratio_moepipe_vs_torch']:.3f}, CPU {t['cpu_ratio_moepipe_vs_torch']:.3f}, "
              f"bitwise equal: {t['bitwise_equal_losses_and_grads']}")
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)")
    print(f"worst_ratio_moepipe_vs_torch={worst:.3f}")


if __name__ == "__main__":
    main()
