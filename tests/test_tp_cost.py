"""Tensor parallelism in the cost model, the simulator, the placers' view and the mesh search
(issue 17, model side). Pure numpy, no process group."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moepipe.config import ConfigError
from moepipe.placement import tensor_parallel_cost as tpc
from moepipe.placement.cost_model import CostModel, stage_costs
from moepipe.placement.mesh_search import enumerate_meshes, evaluate_mesh, search_mesh
from moepipe.placement.model_spec import build_model_spec
from moepipe.placement.placers import Evaluator, inputs_from_config
from moepipe.placement.plan import static_plan
from moepipe.placement.topology import from_config, tp_groups
from moepipe.sim.simulator import simulate, weight_params

from conftest import compose_cfg

SMALL = ("model=small", "train.seq_len=256", "train.batch_size=32", "schedule.microbatches=4", "placer=static", "train.dtype=bf16")


def gpu_topology(nodes=2, per_node=4, memory_gb=80.0, intra=450.0, inter=50.0, lat_us=5.0):
    return from_config({"name": "t", "nodes": nodes, "devices_per_node": per_node,
                        "device_groups": [{"count": nodes * per_node, "name": "H100", "tflops": 690.0, "memory_gb": memory_gb}],
                        "intra_node_bw_gbps": intra, "inter_node_bw_gbps": inter,
                        "intra_node_latency_us": lat_us, "inter_node_latency_us": 2 * lat_us})


@pytest.fixture(scope="module")
def small():
    c = compose_cfg(SMALL)
    spec = build_model_spec(c.model, c.moe, c.train, c.schedule.microbatches, 1, dtype_bytes=2)
    return c, spec


# ------------------------------------------------------------------ the group topology


def test_tp1_is_the_topology_itself_and_every_per_gpu_figure_untouched(small):
    _, spec = small
    topo = gpu_topology()
    assert tp_groups(topo, 1) is topo and topo.tp == 1
    for l in spec.layers:
        assert tpc.dense_params_per_gpu(l, spec, 1) == l.params
        assert tpc.act_elems_per_gpu(l, spec, 1, True) == l.act_elems
    assert tpc.embed_params_per_gpu(spec, 1) == spec.embed_params and tpc.head_params_per_gpu(spec, 1) == spec.head_params
    assert tpc.head_act_elems_per_gpu(spec, 1) == spec.head_act_elems and tpc.expert_share_per_gpu(1) == 1.0
    assert tpc.ring_all_reduce_time(1e9, 1, 1e9, 1e-5) == 0.0


def test_tp1_simulation_unchanged_by_the_tp_path(small):
    """parallel.tp=1 through inputs_from_config (the CLI's path) gives the plain topology's figures, bit for bit."""
    c, spec = small
    c = replace(c, parallel=replace(c.parallel, pp=2, ep=2, dp=1))
    topo = gpu_topology()
    inputs = inputs_from_config(c, topo)
    assert inputs.topology is topo
    plan = static_plan(spec.n_layers, spec.moe_layers, spec.num_experts, 2, 2)
    a = simulate(plan, "1f1b", 4, topo, CostModel(spec), None)
    b = simulate(plan, "1f1b", 4, inputs.topology, inputs.cost_model, None)
    assert a.iteration_time_s == b.iteration_time_s and a.tp == b.tp == 1
    assert np.array_equal(a.peak_activation_bytes, b.peak_activation_bytes) and np.array_equal(a.weight_bytes, b.weight_bytes)


def test_group_topology_devices_and_links():
    topo = gpu_topology(per_node=4)
    g = tp_groups(topo, 2)
    assert g.n_devices == 4 and g.tp == 2 and list(g.node_of) == [0, 0, 1, 1]
    assert g.devices[0].tflops == 2 * topo.devices[0].tflops and g.devices[0].memory_bytes == topo.devices[0].memory_bytes
    assert g.bandwidth[0, 1] == 2 * topo.bandwidth[0, 2] and g.bandwidth[0, 2] == 2 * topo.bandwidth[0, 4]  # TP rank k -> k, each its own port
    assert np.all(g.tp_ring_bandwidth == topo.bandwidth[0, 1]) and np.all(g.tp_ring_latency == topo.latency[0, 1])
    assert tp_groups(topo, 2, 3).n_devices == 3


@pytest.mark.parametrize("tp,per_node,nodes", [(8, 4, 2), (4, 6, 2)])
def test_tp_beyond_a_node_rejected(tp, per_node, nodes):
    with pytest.raises(ConfigError, match=f"parallel.tp={tp} does not fit in a node") as e:
        tp_groups(gpu_topology(nodes=nodes, per_node=per_node), tp)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ compute, collectives, memory


def _plan_costs(spec, topo, tp, pp=2, ep=2, free_comm=False):
    plan = static_plan(spec.n_layers, spec.moe_layers, spec.num_experts, pp, ep)
    groups = tp_groups(topo, tp, pp * ep)
    return plan, groups, stage_costs(CostModel(spec), plan, groups, free_comm=free_comm)


def test_compute_scales_by_one_over_tp(small):
    _, spec = small
    topo = gpu_topology()
    _, _, c1 = _plan_costs(spec, topo, 1, free_comm=True)
    _, _, c2 = _plan_costs(spec, topo, 2, free_comm=True)
    np.testing.assert_allclose(c2.comp, c1.comp / 2, rtol=1e-12)
    np.testing.assert_allclose(c2.ep_busy, c1.ep_busy / 2, rtol=1e-12)


def test_collective_time_formula_and_per_block_charge(small):
    _, spec = small
    n, bw, lat = 3.2e7, 4.5e11, 5e-6
    for tp in (2, 4, 8):
        assert tpc.ring_all_reduce_time(n, tp, bw, lat) == pytest.approx(2 * (tp - 1) * (lat + n / (tp * bw)), rel=1e-12)
    topo = gpu_topology(per_node=4)
    assert tpc.ring_all_reduce_time(n, 4, topo.bandwidth[0, 1], topo.latency[0, 1]) == pytest.approx(topo.all_reduce_time(n, [0, 1, 2, 3]))
    # ep = 1: no all-to-all, so the only communication inside a stage's actions is TP's
    plan, groups, with_comm = _plan_costs(spec, topo, 2, pp=2, ep=1)
    _, _, free = _plan_costs(spec, topo, 2, pp=2, ep=1, free_comm=True)
    T = spec.tokens_per_microbatch
    ar = tpc.ring_all_reduce_time(T * spec.d_model * spec.dtype_bytes, 2, topo.bandwidth[0, 1], topo.latency[0, 1])
    blocks = np.array([b - a for a, b in plan.stage_layers])
    np.testing.assert_allclose(with_comm.comp - free.comp, blocks[:, None] * np.array([2 * ar, 2 * ar, 0.0]), rtol=1e-9)
    assert tpc.block_collective_bytes(spec, T) == T * spec.d_model * spec.dtype_bytes


def test_memory_per_gpu_dense_divides_experts_do_not(small):
    _, spec = small
    topo = gpu_topology()
    plan = static_plan(spec.n_layers, spec.moe_layers, spec.num_experts, 2, 2)
    w1, w2 = weight_params(CostModel(spec), plan, 1), weight_params(CostModel(spec), plan, 2)
    stage0 = range(*plan.stage_layers[0])
    dense = sum(spec.layers[l].params for l in stage0) + spec.embed_params
    rep = sum(tpc.replicated_params(spec.layers[l], spec) for l in stage0)
    experts = w1[0] - dense
    assert experts > 0
    assert w2[0] == pytest.approx((dense - spec.embed_params - rep) / 2 + rep + spec.embed_params / 2 + experts, rel=1e-12)
    # activations: the TP-split parts divide by tp, norms and router only under sequence parallelism
    _, _, a1 = _plan_costs(spec, topo, 1)
    _, _, a2 = _plan_costs(spec, topo, 2)
    assert (a2.act_bytes < a1.act_bytes).all() and (a2.act_bytes > a1.act_bytes / 2).all()
    cm_sp = CostModel(spec, sequence_parallel=True)
    sp = stage_costs(cm_sp, plan, tp_groups(topo, 2, 4))
    np.testing.assert_allclose(sp.act_bytes, a1.act_bytes / 2, rtol=1e-12)


def test_evaluator_matches_simulator_under_tp(small):
    """The placers' fast evaluation equals simulate() under TP too (time and memory)."""
    c, spec = small
    c = replace(c, parallel=replace(c.parallel, pp=2, ep=2, dp=1, tp=2))
    inputs = inputs_from_config(c, gpu_topology())
    assert inputs.topology.tp == 2 and inputs.topology.n_devices == 4
    ev = Evaluator(inputs)
    plan = ev.static_plan()
    res = simulate(plan, inputs.schedule, inputs.microbatches, inputs.topology, inputs.cost_model, None)
    e = ev.evaluate(plan)
    assert e.iteration_time_s == pytest.approx(res.iteration_time_s, rel=1e-9)
    np.testing.assert_allclose(e.act_bytes, res.peak_activation_bytes, rtol=1e-9)
    assert res.summary()["tp"] == 2
    # gradient sync: dense over the EP pair (group links), then experts + norms + router over each TP ring
    topo, want = inputs.topology, 0.0
    for p, (a, b) in enumerate(plan.stage_layers):
        layers = [spec.layers[l] for l in range(a, b)]
        dense = sum(l.params for l in layers) + (spec.embed_params if p == 0 else spec.head_params)
        held = sum(l.expert_params * spec.num_experts / 2 for l in layers if l.is_moe)
        rep = sum(tpc.replicated_params(l, spec) for l in layers) + (spec.d_model if p == 1 else 0)
        grp = [2 * p, 2 * p + 1]
        t = topo.all_reduce_time(dense * 4, grp) + tpc.ring_all_reduce_time((held + rep) * 4, 2, topo.tp_ring_bandwidth[0], topo.tp_ring_latency[0])
        want = max(want, t)
    assert res.grad_sync_s == pytest.approx(want, rel=1e-9)


# ------------------------------------------------------------------ mesh search


def test_enumerate_meshes():
    shapes = enumerate_meshes(16, 8, 4)
    assert all(tp * pp * ep * dp == 16 and 8 % pp == 0 and 4 % ep == 0 and tp in (1, 2, 4, 8) for tp, pp, ep, dp in shapes)
    assert (1, 1, 1, 16) in shapes and (8, 2, 1, 1) in shapes and len(set(shapes)) == len(shapes)
    assert {ep for _, _, ep, _ in enumerate_meshes(8, 4, 0)} == {1}


@pytest.fixture(scope="module")
def search():
    """small on 2 nodes x 4 GPUs of 1 GB: the whole model (parameters + AdamW ~2.4 GB) fits no single GPU."""
    c = compose_cfg(SMALL)
    return c, search_mesh(c, gpu_topology(memory_gb=1.0))


def test_search_returns_only_feasible_shapes_and_the_fastest(search):
    c, s = search
    assert s.feasible and s.rejected
    for r in s.feasible:
        assert r.tp * r.pp * r.ep * r.dp == 8 and r.peak_memory_bytes <= r.memory_capacity_bytes
        assert r.tokens_per_s == pytest.approx(c.train.batch_size * c.train.seq_len / r.iteration_time_s)
    assert all(r.reason for r in s.rejected)
    assert s.best.iteration_time_s == min(r.iteration_time_s for r in s.feasible)
    again = evaluate_mesh(c, gpu_topology(memory_gb=1.0), *s.best.shape)
    assert again.feasible and again.iteration_time_s == s.best.iteration_time_s
    assert s.to_json(3)["chosen"]["tp"] == s.best.tp


def test_a_model_too_large_without_tp_or_pp_picks_them(search):
    """tp1 pp1 never fits (whole dense part per GPU); here dense-only `small` on 0.3 GB GPUs fits no tp1 mesh at all."""
    _, s = search
    assert "GB per GPU" in {r.shape: r.reason for r in s.rejected}[(1, 1, 1, 8)]
    assert s.best.tp > 1 or s.best.pp > 1
    c = compose_cfg(SMALL + ("moe=dense",))
    dense = search_mesh(c, gpu_topology(memory_gb=0.3))
    no_tp = [r for r in dense.rejected if r.tp == 1]
    assert {r.shape for r in no_tp} == {m for m in enumerate_meshes(8, 8, 0) if m[0] == 1}
    assert all("GB per GPU" in r.reason or "microbatches" in r.reason for r in no_tp)
    assert dense.best is not None and dense.best.tp > 1


# ------------------------------------------------------------------ moepipe-sim


def _cli_run(tmp_path, *overrides):
    from moepipe.cli.sim import run

    return run(compose_cfg(SMALL + ("sim.out_trace=false", "topology=nvlink_8gpu") + overrides, validated=False), tmp_path)


def test_cli_simulates_tp_and_searches_meshes(tmp_path):
    s = _cli_run(tmp_path / "tp", "parallel=single", "parallel.pp=2", "parallel.ep=2", "parallel.tp=2")
    assert s["tp"] == 2 and s["world_size"] == 8 and s["topology"] == "nvlink_8gpu/tp2" and len(s["peak_activation_bytes"]) == 4
    one = _cli_run(tmp_path / "tp1", "parallel=single", "parallel.pp=2", "parallel.ep=2")
    assert max(s["peak_activation_bytes"]) < max(one["peak_activation_bytes"])
    # with free communication only compute is left: twice the GPUs per device, half the time
    free = [_cli_run(tmp_path / f"free{tp}", "parallel=single", "parallel.pp=2", "parallel.ep=2", f"parallel.tp={tp}", "sim.free_comm=true")["iteration_time_s"]
            for tp in (1, 2)]
    assert free[1] == pytest.approx(free[0] / 2, rel=1e-9)
    found = _cli_run(tmp_path / "search", "sim.search_mesh=true", "sim.search_top=3")
    c = compose_cfg(SMALL + ("topology=nvlink_8gpu",))
    want = search_mesh(c, from_config(c.topology))
    assert found["mesh_search"]["chosen"]["iteration_time_s"] == want.best.iteration_time_s
    assert found["mesh_search"]["n_feasible"] == len(want.feasible) and "chosen: " + want.best.label in found["table"]
    assert (tmp_path / "search" / "summary.json").is_file()


def test_cli_tp_beyond_a_node_is_one_line(tmp_path):
    # config's own check (a TP group inside a node) fires before the topology is built
    with pytest.raises(ConfigError, match=r"parallel.tp=16 does not fit in a node of topology.devices_per_node=8"):
        _cli_run(tmp_path, "topology=ib_4x8", "parallel=single", "parallel.tp=16", "model.n_heads=16")  # heads divide: the node is the problem


def test_migration_estimate_under_tp_sends_experts_to_every_gpu_of_a_group(small):
    """Dense blocks move once per group (split over its GPUs, over tp x the link); an expert goes
    whole to every GPU of the new holder's group."""
    from moepipe.placement.placers import migration_bytes

    c, spec = small
    ins = {tp: inputs_from_config(replace(c, parallel=replace(c.parallel, pp=2, ep=2, dp=1, tp=tp)), gpu_topology()) for tp in (1, 2)}
    old = static_plan(spec.n_layers, spec.moe_layers, spec.num_experts, 2, 2)
    l = spec.moe_layers[0]
    new_map = dict(old.expert_map)
    new_map[l] = [[1 - r for r in owners] for owners in old.expert_map[l]]  # swap one MoE layer's experts between the EP ranks
    swap = replace(old, expert_map=new_map)
    b1, b2 = migration_bytes(old, swap, ins[1]), migration_bytes(old, swap, ins[2])
    assert b1.sum() > 0 and np.allclose(b2, 2 * b1)
    cut = old.stage_layers[0][1]  # block `cut` moves from pipeline rank 1 to 0
    moved = replace(old, stage_layers=[(0, cut + 1), (cut + 1, spec.n_layers)])
    d1, d2 = migration_bytes(old, moved, ins[1]).sum(), migration_bytes(old, moved, ins[2]).sum()
    dense = float(spec.layers[cut].params) * 12 * 2  # to both EP ranks of pipeline rank 0
    assert d1 > dense and d2 == pytest.approx(dense + 2 * (d1 - dense))
