"""`moepipe-sim`: simulate one iteration of the configured job (same conf/ tree as training).

    moepipe-sim model=mixtral_8x7b topology=ib_16x8 parallel.pp=16 parallel.ep=8 \
        schedule=interleaved_1f1b schedule.microbatches=32 train.batch_size=256 train.seq_len=4096

Writes into the Hydra run directory: summary.json, plan.json, trace.json (Perfetto), gantt.png.
Simulator options live under `sim` (moepipe.config.SimConfig): `sim.routing=zipf sim.zipf_s=1.2`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
from omegaconf import DictConfig

from moepipe.config import ConfigError, SimConfig, conf_dir, moe_layer_ids, register_configs, validate, world_size

CONF_DIR = conf_dir()


def make_routing(n_moe: int, num_experts: int, sc: SimConfig) -> Optional[np.ndarray]:
    if sc.routing == "uniform" or n_moe == 0:
        return None
    rng = np.random.default_rng(sc.seed)
    w = 1.0 / np.arange(1, num_experts + 1) ** sc.zipf_s
    return np.stack([rng.permutation(w) for _ in range(n_moe)])


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Simulate the composed config; write the outputs into out_dir; return the summary."""
    from moepipe.placement.cost_model import CostModel
    from moepipe.placement.model_spec import build_model_spec
    from moepipe.placement.plan import static_plan, to_json
    from moepipe.placement.topology import from_config
    from moepipe.sim.schedules import plan_style
    from moepipe.sim.simulator import simulate

    c = validate(cfg)
    sc = c.sim
    if c.placer.name != "static":
        print(f"moepipe-sim: placer.name={c.placer.name} is simulated with the static plan (placers come later)", file=sys.stderr)
    ws = world_size(c)
    topo = from_config(c.topology, ws)
    dtype = {"fp32": 4, "bf16": 2}.get(c.train.dtype) or (4 if topo.devices[0].kind == "cpu" else 2)
    spec = build_model_spec(c.model, c.moe, c.train, c.schedule.microbatches, c.parallel.dp, dtype_bytes=dtype)
    cm = CostModel(spec, efficiency=sc.efficiency, profile=sc.profile)
    moe_ids = moe_layer_ids(c.model, c.moe)
    plan = static_plan(
        c.model.n_layers, moe_ids, c.moe.num_experts, c.parallel.pp, c.parallel.ep, c.schedule.virtual_stages, plan_style(c.schedule.name), c.parallel.dp
    )
    res = simulate(plan, c.schedule.name, c.schedule.microbatches, topo, cm, make_routing(len(moe_ids), c.moe.num_experts, sc), sc.free_comm)

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = res.summary() | {
        "model": c.model.name,
        "topology": topo.name,
        "world_size": ws,
        "tokens_per_microbatch": spec.tokens_per_microbatch,
        "total_params": spec.total_params(),
        "sim": asdict(sc),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "plan.json").write_text(to_json(plan, indent=1))
    if sc.out_trace:
        res.write_trace(str(out_dir / "trace.json"))
        res.write_gantt(str(out_dir / "gantt.png"))
    return summary


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        s = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        sys.exit(2)
    print(
        f"iteration_time_s={s['iteration_time_s']:.6g} bubble_fraction={s['bubble_fraction']:.4f} "
        f"lower_bound_s={s['lower_bound_s']:.6g} balanced_bound_s={s['balanced_bound_s']:.6g} "
        f"balanced_comm_bound_s={s['balanced_comm_bound_s']:.6g}"
    )


if __name__ == "__main__":
    main()
