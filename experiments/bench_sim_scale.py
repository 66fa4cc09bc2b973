"""Simulator speed at scale: 1,024 devices (128 nodes x 8 GPUs, InfiniBand), 64 layers,
256 experts per layer (top-8, Zipf(0.5)-skewed routing), pp=16 x ep=64, 64 microbatches.

Writes results/bench_sim_scale.json; prints `sim_time_s=<t>` last (plan + cost model +
event simulation, after imports). Usage: python experiments/bench_sim_scale.py [--schedule 1f1b]
`--quick --out /tmp/x.json`: 16 devices, 8 layers, 32 experts (for tests).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import fig_common as fc  # noqa: E402
import numpy as np  # noqa: E402

from moepipe.config import DeviceGroupConfig, ModelConfig, MoEConfig, TopologyConfig, TrainConfig, moe_layer_ids  # noqa: E402
from moepipe.placement.cost_model import CostModel  # noqa: E402
from moepipe.placement.model_spec import build_model_spec  # noqa: E402
from moepipe.placement.plan import static_plan  # noqa: E402
from moepipe.placement.topology import from_config  # noqa: E402
from moepipe.sim import simulate  # noqa: E402
from moepipe.sim.schedules import plan_style  # noqa: E402
from moepipe.train.metrics import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--pp", type=int, default=16)
    ap.add_argument("--ep", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=64)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--experts", type=int, default=256)
    fc.add_output_args(ap, str(ROOT / "results" / "bench_sim_scale.json"))
    args = ap.parse_args()
    if args.quick:
        args.pp, args.ep, args.microbatches, args.layers, args.experts = 2, 8, 4, 8, 32
    args.out = fc.check_output(args)
    v = 1 if args.schedule in ("gpipe", "1f1b") else 2
    model = ModelConfig(name="bench", vocab_size=32000, d_model=4096, n_layers=args.layers, n_heads=32, n_kv_heads=8, ffn_hidden=14336, max_seq_len=4096)
    moe = MoEConfig(num_experts=args.experts, top_k=8, expert_hidden=2048, num_shared_experts=1)
    world = args.pp * args.ep
    train = TrainConfig(batch_size=args.microbatches * 16 * (world // (args.pp * args.ep)), seq_len=4096)
    topo_cfg = TopologyConfig(
        name=f"ib_{max(1, world // 8)}x8", nodes=max(1, world // 8), devices_per_node=8,
        device_groups=[DeviceGroupConfig(count=world, name="H100-SXM", tflops=690.0, memory_gb=80.0)],
        intra_node_bw_gbps=450.0, intra_node_latency_us=5.0, inter_node_bw_gbps=50.0, inter_node_latency_us=10.0,
    )
    if v > 1:  # import torch's schedule module before the clock starts: we time the simulator, not imports
        import torch.distributed.pipelining.schedules  # noqa: F401
    moe_ids = moe_layer_ids(model, moe)
    rng = np.random.default_rng(0)
    ranks = np.arange(1, moe.num_experts + 1)
    routing = np.stack([rng.permutation(1.0 / ranks**0.5) for _ in moe_ids])  # Zipf(0.5), experts shuffled per layer

    t0 = time.perf_counter()
    topo = from_config(topo_cfg, world)
    spec = build_model_spec(model, moe, train, microbatches=args.microbatches, dp=1)
    plan = static_plan(model.n_layers, moe_ids, moe.num_experts, pp=args.pp, ep=args.ep, virtual_stages=v, style=plan_style(args.schedule))
    res = simulate(plan, args.schedule, args.microbatches, topo, CostModel(spec, efficiency=0.5), routing)
    dt = time.perf_counter() - t0

    out = {
        "devices": world, "layers": model.n_layers, "experts": moe.num_experts, "microbatches": args.microbatches,
        "schedule": args.schedule, "pp": args.pp, "ep": args.ep, "sim_time_s": dt,
        "events": len(res.timeline),
    } | {k: v for k, v in res.summary().items() if k not in ("peak_activation_bytes", "busy_s")}
    out["peak_activation_bytes_max"] = float(res.peak_activation_bytes.max())
    out["provenance"] = fc.provenance(args, seed=0)  # routing: np.random.default_rng(0)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, out)
    print(f"iteration_time_s={res.iteration_time_s:.4f} bubble={res.bubble_fraction:.4f} lower={res.lower_bound_s:.4f} balanced={res.balanced_bound_s:.4f}")
    print(f"sim_time_s={dt:.3f}")


if __name__ == "__main__":
    main()
