"""Forward+backward throughput of the native MoE layer against fairscale's MOELayer(Top2Gate)
and moepipe's Tutel backend (Tutel's routing, dispatch kernels and llama_ffn SwiGLU experts).

Same process, same SwiGLU expert weights and gate weight, top-2 softmax, capacity 2T/E, first
choices before second ones, GShard top-1 aux loss. native and fairscale renormalise the k
weights after the drop; Tutel renormalises before it (its only mode), at the same cap (its
k * floor(cf * ceil(T/E)) = 2T/E here). Repeats rotate the order of the layers so background
load on the shared cores hits all alike; the median is reported.

    .venv/bin/python experiments/bench_moe_layer.py            # writes results/bench_moe_layer.json
    .venv/bin/python experiments/bench_moe_layer.py --profile  # plus a torch.profiler table of native at the largest E
    .venv/bin/python experiments/bench_moe_layer.py --quick --out /tmp/b.json  # tiny smoke run (< 10 s; the test suite's)

The last line printed is `speedup_e64=<native tokens/s / fairscale tokens/s at E=64>`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# OpenMP threads that spin-wait at every barrier collapse when another process holds one of the
# two cores (a 128x256x1024 matmul measured 4 ms with the default policy, 16 ms ACTIVE, 1 ms
# PASSIVE), and they punish the layer with more (smaller) ops the most. Sleeping waiters keep
# the comparison about the layers. Must be set before torch loads libgomp; `--omp-default`
# (or an OMP_WAIT_POLICY already in the environment) keeps the other behaviour.
if "--omp-default" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from moepipe.config import MoEConfig  # noqa: E402
from moepipe.model.fairscale_moe import ensure_process_group  # noqa: E402
from moepipe.model.moe import MoELayer  # noqa: E402
from moepipe.model.tutel_moe import build_tutel_moe  # noqa: E402
from moepipe.train.run_info import run_info  # noqa: E402


def build(num_experts: int, d_model: int, hidden: int, seed: int = 0):
    from fairscale.nn.moe import MOELayer, Top2Gate

    cfg = MoEConfig(
        num_experts=num_experts, top_k=2, expert_hidden=hidden, capacity_factor=1.0, drop_policy="position",
        score_func="softmax", normalize_weights=True, normalize_after_drop=True, aux_loss_type="top1",
        aux_loss_coef=0.01, z_loss_coef=0.0,  # fairscale has no z-loss
    )
    torch.manual_seed(seed)
    native = MoELayer(d_model, cfg)
    for name, p in native.named_parameters():
        nn.init.normal_(p, std=0.02 if "router" not in name else 0.1)
    gate = Top2Gate(d_model, num_experts)
    with torch.no_grad():
        gate.wg.weight.copy_(native.router.weight)
    fs = MOELayer(gate, nn.ModuleList(native.experts[str(e)] for e in range(num_experts)))
    tut = build_tutel_moe(d_model, MoEConfig(**{**cfg.__dict__, "backend": "tutel", "normalize_after_drop": False}))
    tut.load_state_dict(native.state_dict(), strict=True)  # same names, same weights
    for layer in (native, fs, tut):
        layer.train()
    return native, fs, tut, cfg


def step_native(layer, x, g):
    out = layer(x)
    (out * g).sum().backward()


def step_fairscale(layer, x, g, aux_coef):
    out = layer(x.unsqueeze(1)).squeeze(1)  # (s, t=1, m)
    ((out * g).sum() + aux_coef * layer.l_aux).backward()


def timed(fn, params, x) -> float:
    for p in params:
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dropped_fraction(layer, x) -> float:
    """One forward's dropped share from the layer's routing statistics (read on the host once)."""
    layer.stats.reset()
    with torch.no_grad():
        layer(x.detach())
    stats = layer.stats.host()
    return (stats.asked - int(stats.kept.sum())) / stats.asked


LAYERS = ("native", "fairscale", "tutel")


def bench_one(num_experts, tokens, d_model, hidden, warmup, repeats):
    native, fs, tut, cfg = build(num_experts, d_model, hidden)
    params = list(native.parameters()) + list(fs.parameters()) + list(tut.parameters())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_model, generator=gen).requires_grad_(True)
    g = torch.randn(tokens, d_model, generator=gen)
    run = {
        "native": lambda: step_native(native, x, g),
        "fairscale": lambda: step_fairscale(fs, x, g, cfg.aux_loss_coef),
        "tutel": lambda: step_native(tut, x, g),
    }
    for _ in range(warmup):
        for name in LAYERS:
            timed(run[name], params, x)
    times = {name: [] for name in LAYERS}
    for i in range(repeats):
        for j in range(len(LAYERS)):  # rotate who goes first
            name = LAYERS[(i + j) % len(LAYERS)]
            times[name].append(timed(run[name], params, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "num_experts": num_experts,
        "capacity": 2 * tokens // num_experts,
        "dropped_fraction": dropped_fraction(native, x),
        "tutel_dropped_fraction": dropped_fraction(tut, x),
        "tutel_capacity": tut.last_capacity,
        "native_s": med["native"],
        "fairscale_s": med["fairscale"],
        "tutel_s": med["tutel"],
        "native_tokens_per_s": tokens / med["native"],
        "fairscale_tokens_per_s": tokens / med["fairscale"],
        "tutel_tokens_per_s": tokens / med["tutel"],
        "speedup": med["fairscale"] / med["native"],
        "speedup_of_minima": min(times["fairscale"]) / min(times["native"]),
        "native_vs_tutel": med["tutel"] / med["native"],
        "native_times_s": times["native"],
        "fairscale_times_s": times["fairscale"],
        "tutel_times_s": times["tutel"],
    }, native, x, g


def profile_native(native, x, g, rows=15) -> str:
    from torch.profiler import ProfilerActivity, profile

    step_native(native, x, g)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_native(native, x, g)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench_moe_layer.json"))
    ap.add_argument("--profile", action="store_true", help="print a profiler table of the native layer at the largest E")
    ap.add_argument("--omp-default", action="store_true", help="do not set OMP_WAIT_POLICY=PASSIVE (see the top of the file)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run (give --out)")
    args = ap.parse_args(argv)
    if args.quick:
        args.experts, args.tokens, args.d_model, args.hidden, args.warmup, args.repeats = [8, 64], 256, 32, 64, 0, 1

    torch.set_num_threads(args.threads)
    ensure_process_group()
    for e in args.experts:
        if args.tokens % e:
            raise SystemExit(f"--tokens={args.tokens} must be divisible by every E (fairscale's Top2Gate asserts it); got E={e}")

    rows = []
    last = None
    for e in args.experts:
        row, native, x, g = bench_one(e, args.tokens, args.d_model, args.hidden, args.warmup, args.repeats)
        rows.append(row)
        last = (native, x, g)
        print(f"E={e:3d}  native {row['native_s'] * 1e3:8.1f} ms  fairscale {row['fairscale_s'] * 1e3:8.1f} ms  "
              f"tutel {row['tutel_s'] * 1e3:8.1f} ms  speedup {row['speedup']:.2f}x", flush=True)

    by_e = {r["num_experts"]: r for r in rows}
    speedup_e64 = by_e[64]["speedup"] if 64 in by_e else None
    info = run_info()
    result = {
        "speedup_e64": speedup_e64,
        "config": {
            "tokens": args.tokens, "d_model": args.d_model, "expert_hidden": args.hidden, "top_k": 2,
            "capacity": "2T/E (native capacity_factor=1.0, normalize_after_drop, aux top1)",
            "tutel": "moe.backend=tutel, capacity_factor=1.0 (Tutel cap k*floor(cf*ceil(T/E)) = 2T/E), weights renormalised before the drop, aux top1",
            "quick": args.quick,
            "warmup": args.warmup, "repeats": args.repeats, "statistic": "median", "step": "forward+backward",
        },
        "results": {str(r["num_experts"]): r for r in rows},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_at_end": os.getloadavg(),
            "git_commit": info["git_commit"],
            "run_info": info,
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print()
    print(f"{'E':>4} {'cap':>5} {'drop%':>6} {'native tok/s':>13} {'fairscale tok/s':>16} {'tutel tok/s':>12} {'nat/fs':>7} {'nat/tutel':>9}")
    for r in rows:
        print(
            f"{r['num_experts']:>4} {r['capacity']:>5} {100 * r['dropped_fraction']:>6.1f} "
            f"{r['native_tokens_per_s']:>13.0f} {r['fairscale_tokens_per_s']:>16.0f} {r['tutel_tokens_per_s']:>12.0f} "
            f"{r['speedup']:>6.2f}x {r['native_vs_tutel']:>8.2f}x"
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load {os.getloadavg()[0]:.1f}, commit {info['git_commit']}; wrote {args.out}")
    if args.profile and last is not None:
        print(profile_native(*last))
    print(f"speedup_e64={speedup_e64:.3f}" if speedup_e64 is not None else "speedup_e64=nan")
    return speedup_e64


if __name__ == "__main__":
    main()
