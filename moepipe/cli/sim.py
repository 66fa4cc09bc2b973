"""`moepipe-sim` (also `python -m moepipe.cli.sim`): simulate one iteration of the configured job (same conf/ tree as training).

    moepipe-sim model=mixtral_8x7b topology=ib_16x8 parallel.pp=16 parallel.ep=8 \
        schedule=interleaved_1f1b schedule.microbatches=32 train.batch_size=256 train.seq_len=4096

Writes into the Hydra run directory: summary.json, plan.json, trace.json (Perfetto), gantt.png.
Simulator options live under `sim` (moepipe.config.SimConfig): `sim.routing=zipf sim.zipf_s=1.2`.
The plan is the configured placer's (`placer.name`) for that routing times the injected
`workload.kind` skew at step 0; summary.json names the placer, its plan's stage split, the
routing it planned for, and the static plan's time beside it.

`parallel.tp=2` simulates tensor parallelism: each of the pp*ep*dp placement devices is a TP group
of tp GPUs inside a node (moepipe.placement.tensor_parallel_cost); memory figures are per GPU.
`sim.search_mesh=true` instead searches (tp, pp, ep, dp) over the whole topology with the
configured schedule and placer (moepipe.placement.mesh_search), prints the best `sim.search_top`
and writes every shape's figures to summary.json (`mesh_search`):

    moepipe-sim sim.search_mesh=true model=mixtral_8x7b topology=ib_16x8 train.batch_size=1024 \
        train.seq_len=4096 schedule.microbatches=8
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

from moepipe.config import ConfigError, SimConfig, conf_dir, moe_layer_ids, register_configs, validate

CONF_DIR = conf_dir()


def make_routing(n_moe: int, num_experts: int, sc: SimConfig) -> Optional[np.ndarray]:
    if sc.routing == "uniform" or n_moe == 0:
        return None
    rng = np.random.default_rng(sc.seed)
    w = 1.0 / np.arange(1, num_experts + 1) ** sc.zipf_s
    return np.stack([rng.permutation(w) for _ in range(n_moe)])


# The workload step the simulator plans for: the skew the runtime would inject at step 0.
WORKLOAD_STEP = 0


def expert_load(c, moe_ids: list[int]) -> tuple[Optional[dict[int, np.ndarray]], str, Optional[dict[int, np.ndarray]]]:
    """(share of tokens per expert per MoE layer, or None for uniform; a label of its source;
    token origins per MoE layer [ep, E], or None when every EP rank's data routes alike).

    `sim.routing` is the router's own preference, `workload.kind` the injected skew; the runtime
    adds log(p E) to the logits, which multiplies the router's odds by p, so both together
    multiply here. A workload that takes `source=` skews per EP rank: the runtime asks each
    rank for its own distribution, so here each source row is its distribution times the
    routing, each rank holding 1/ep of the tokens (the origins), and the load is their sum."""
    from moepipe.placement.workloads import _takes_source, expert_distribution, origin_distribution
    from moepipe.plugins.registry import resolve

    E, w, ep = c.moe.num_experts, c.workload, c.parallel.ep
    base = make_routing(len(moe_ids), E, c.sim)
    parts = [] if base is None else [f"sim.routing={c.sim.routing}(zipf_s={c.sim.zipf_s})"]
    origins = None
    if w.kind != "none" and moe_ids:
        kw = dict(strength=w.strength, period=w.period, burst_every=w.burst_every, seed=w.seed)
        if _takes_source(resolve("workload", w.kind, field="workload kind")):
            origins = {}
            for i, l in enumerate(moe_ids):
                o = origin_distribution(w.kind, WORKLOAD_STEP, l, E, ep=ep, **kw) * (1.0 if base is None else base[i][None, :])
                origins[l] = o / o.sum(1, keepdims=True) / ep
            parts.append(f"workload.kind={w.kind}(strength={w.strength}, step {WORKLOAD_STEP}, per source EP rank)")
            return {l: o.sum(0) for l, o in origins.items()}, " x ".join(parts), origins
        skew = np.stack([expert_distribution(w.kind, WORKLOAD_STEP, l, E, ep=ep, **kw) for l in moe_ids])
        base = skew if base is None else base * skew
        parts.append(f"workload.kind={w.kind}(strength={w.strength}, step {WORKLOAD_STEP})")
    if base is None:
        return None, "uniform", None
    return {l: row / row.sum() for l, row in zip(moe_ids, base)}, " x ".join(parts), None


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Plan the composed config with its placer under its routing and workload, simulate that
    plan (and the static one, for comparison); write the outputs into out_dir; return the summary."""
    from moepipe.placement.placers import inputs_from_config, make_placement
    from moepipe.placement.placers.inputs import routing_of
    from moepipe.placement.plan import to_json
    from moepipe.placement.topology import from_config
    from moepipe.sim.simulator import simulate, weight_grad_mode

    c = validate(cfg)
    sc = c.sim
    moe_ids = moe_layer_ids(c.model, c.moe)
    if sc.search_mesh:
        return run_search(c, out_dir, moe_ids)
    par = c.parallel
    ws = par.pp * par.ep * par.dp * par.tp  # GPUs; under TP the placer and simulator see one device per TP group
    load, routing_label, origins = expert_load(c, moe_ids)
    inputs = inputs_from_config(c, from_config(c.topology, ws), expert_load=load, origins=origins)
    topo = inputs.topology
    routing = routing_of(inputs)
    pc = c.placer
    plan = make_placement(pc.name, inputs, pc.replica_slots, compare_layouts=True)

    def sim(p):
        return simulate(p, c.schedule.name, c.schedule.microbatches, topo, inputs.cost_model, routing, sc.free_comm, origins=origins,
                        weight_grad=weight_grad_mode(c.schedule.executor, c.schedule.lean_weight_grad, c.train.activation_checkpointing))

    res = sim(plan)
    static_s = float(res.iteration_time_s) if pc.name == "static" else float(sim(make_placement("static", inputs)).iteration_time_s)

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = res.summary() | {
        "model": c.model.name,
        "topology": topo.name,
        "world_size": ws,
        "tokens_per_microbatch": inputs.spec.tokens_per_microbatch,
        "total_params": inputs.spec.total_params(),
        "placer": pc.name,
        "placer_predicted_s": float(plan.meta.get("predicted_s", res.iteration_time_s)),
        "static_iteration_time_s": static_s,
        "stage_layers": [list(r) for r in plan.stage_layers],
        "routing": routing_label,
        "token_origins": "per source EP rank (workload)" if origins is not None else "evenly spread",
        "placer_a2a_bytes_intra_node": plan.meta.get("a2a_bytes_intra_node"),  # the placer's figures (per iteration); the
        "placer_a2a_bytes_inter_node": plan.meta.get("a2a_bytes_inter_node"),  # simulated ones are a2a_bytes_intra/inter_node
        "ep_layout": plan.meta.get("ep_layout"),  # EP inside nodes vs across: which is faster (the runtime keeps ep_inner)
        "workload": asdict(c.workload),
        "sim": asdict(sc),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "plan.json").write_text(to_json(plan, indent=1))
    if sc.out_trace:
        res.write_trace(str(out_dir / "trace.json"))
        res.write_gantt(str(out_dir / "gantt.png"))
    return summary


def run_search(c, out_dir: Path, moe_ids: list[int]) -> dict[str, Any]:
    """sim.search_mesh: every (tp, pp, ep, dp) on the whole topology; summary.json holds them all."""
    from moepipe.placement.mesh_search import format_table, search_mesh
    from moepipe.placement.topology import from_config

    topo = from_config(c.topology)
    search = search_mesh(c, topo, workload=lambda cc: expert_load(cc, moe_ids)[::2])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"model": c.model.name, "topology": topo.name, "world_size": topo.n_devices, "mesh_search": search.to_json(),
               "table": format_table(search, c.sim.search_top), "sim": asdict(c.sim)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_line(s: dict[str, Any]) -> str:
    """The one line moepipe-sim prints: the simulated plan's figures and which plan it was."""
    return (
        f"iteration_time_s={s['iteration_time_s']:.6g} bubble_fraction={s['bubble_fraction']:.4f} "
        f"lower_bound_s={s['lower_bound_s']:.6g} balanced_bound_s={s['balanced_bound_s']:.6g} "
        f"balanced_comm_bound_s={s['balanced_comm_bound_s']:.6g} placer={s['placer']} "
        f"placer_predicted_s={s['placer_predicted_s']:.6g} static_iteration_time_s={s['static_iteration_time_s']:.6g} routing={s['routing'].replace(' ', '')} "
        f"a2a_bytes_intra_node={s['a2a_bytes_intra_node']:.6g} a2a_bytes_inter_node={s['a2a_bytes_inter_node']:.6g}"
        + (f" ep_layout_best={s['ep_layout']['best']}" if s.get("ep_layout") else "")
        + (f" tp={s['tp']} (memory per GPU)" if s.get("tp", 1) > 1 else "")
    )


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        s = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        sys.exit(2)
    print(s["table"] if "mesh_search" in s else summary_line(s))

if __name__ == "__main__":
    main()
