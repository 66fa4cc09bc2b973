"""The discrete-event simulator: bubble formulas, in-flight microbatches, zero-bubble orders,
communication, MoE imbalance, bounds, determinism and exports."""
import json

import numpy as np
import pytest

from moepipe.config import ConfigError, DeviceGroupConfig, ModelConfig, MoEConfig, TopologyConfig, TrainConfig, moe_layer_ids
from moepipe.placement.cost_model import CostModel
from moepipe.placement.model_spec import build_model_spec
from moepipe.placement.plan import static_plan
from moepipe.placement.topology import free_topology, from_config
from moepipe.sim import engine, schedule_order, simulate, simulate_order
from moepipe.sim.schedules import Action, plan_style


def bubble(name, p, v, m, f=1.0, b=1.0, w=1.0):
    order, s2r = schedule_order(name, p, v, m)
    r = simulate_order(order, s2r, m, np.tile([f, b, w], (p * v, 1)))
    return 1 - r.busy.sum() / (p * r.makespan), r


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (4, 13), (8, 16)])
def test_single_stage_bubble_formula(name, p, m):
    bub, r = bubble(name, p, 1, m, 1.0, 1.0, 1.0)
    assert bub == pytest.approx((p - 1) / (m + p - 1))
    assert r.makespan == pytest.approx((m + p - 1) * 3.0)


@pytest.mark.parametrize("p,m", [(2, 8), (4, 4), (4, 8), (4, 12), (8, 16)])
def test_interleaved_1f1b_bubble_formula(p, m):
    # torch's Interleaved1F1B order, v=2, m a multiple of p: the Megatron-LM figure
    # bubble = ((p-1)/v) / (m + (p-1)/v), i.e. (p-1) chunk-times of idle per rank
    v = 2
    bub, r = bubble("interleaved_1f1b", p, v, m)
    assert bub == pytest.approx(((p - 1) / v) / (m + (p - 1) / v))
    assert r.makespan == pytest.approx(3.0 * (v * m + p - 1))


def test_1f1b_in_flight_is_p_minus_s_and_gpipe_is_m():
    p, m = 4, 8
    _, r = bubble("1f1b", p, 1, m)
    peaks = [int(r.inflight[s].max()) for s in range(p)]
    assert peaks == [p - s for s in range(p)]
    _, g = bubble("gpipe", p, 1, m)
    assert [int(g.inflight[s].max()) for s in range(p)] == [m] * p


@pytest.mark.parametrize("p,m", [(2, 8), (4, 8), (4, 12), (8, 16)])
def test_zero_bubble_orders_beat_1f1b(p, m):
    # Each rank holds two chunks of F = I = W = 1 (ZB-1P / ZB-V, Qi et al. 2023): torch's orders
    # leave (p-1) units idle per rank, i.e. bubble (p-1)/(6m + p-1); 1F1B over the same work
    # (one stage of F = I = W = 2 per rank) keeps (p-1)/(m + p-1).
    ref, _ = bubble("1f1b", p, 1, m, 2.0, 2.0, 2.0)
    assert ref == pytest.approx((p - 1) / (m + p - 1))
    for name in ("interleaved_zb", "zbv"):
        bub, r = bubble(name, p, 2, m)
        assert r.makespan == pytest.approx(6 * m + p - 1)
        assert bub == pytest.approx((p - 1) / (6 * m + p - 1))
        assert bub < ref / 3
    dpv, _ = bubble("dualpipev", p, 2, max(m, 2 * p))
    assert dpv < ref


def test_send_costs_on_the_critical_path():
    order, s2r = schedule_order("gpipe", 2, 1, 1)
    r = simulate_order(order, s2r, 1, [[1, 1, 1], [1, 1, 1]], send=[0.5, 0.0])
    # F0 -> send -> F1 -> B1 -> send back -> B0 (full backward = B + W)
    assert r.makespan == pytest.approx(1 + 0.5 + 1 + 2 + 0.5 + 2)
    a2a = simulate_order(order, s2r, 1, [[1, 1, 1], [1, 1, 1]], a2a=[[0.25, 0.25, 0], [0.25, 0.25, 0]])
    assert a2a.makespan == pytest.approx(6 + 4 * 0.25)


@pytest.mark.parametrize("name,p,v,m", [("gpipe", 3, 1, 5), ("1f1b", 4, 1, 7), ("interleaved_1f1b", 4, 2, 8), ("interleaved_zb", 2, 2, 4),
                                         ("zbv", 4, 2, 8), ("dualpipev", 2, 2, 4), ("chimera", 4, 1, 8), ("pipedream_2bw", 2, 1, 4)])
def test_makespan_only_engine_equals_the_event_engine(name, p, v, m):
    # engine.makespan replays run()'s arithmetic on the order compiled once: the same makespan
    # bit for bit, and the same in-flight snapshots, for random costs (zeros included)
    order, s2r = schedule_order(name, p, v, m)
    S = len(s2r)
    rng = np.random.default_rng(p * 100 + m)
    for trial in range(4):
        comp = rng.random((S, 3)) * (trial > 0)
        a2a = rng.random((S, 3)) * (trial % 2)
        send = rng.random(S) * (trial > 1)
        over = rng.random(p) * (trial == 3)
        ref = engine.run(order, s2r, m, comp, a2a, send, over)
        fast = engine.makespan(order, s2r, m, comp, a2a, send, over)
        assert fast.makespan == ref.makespan and fast.n_actions == ref.n_actions
        for r in ref.inflight:
            assert np.array_equal(fast.inflight[r], ref.inflight[r]) and np.array_equal(fast.inflight_past_i[r], ref.inflight_past_i[r])
    bad = {0: [Action("B", 0, 0), Action("F", 0, 0)], 1: [Action("F", 1, 0), Action("B", 1, 0)]}
    with pytest.raises(RuntimeError, match="deadlock"):
        engine.makespan(bad, [0, 1], 1, np.ones((2, 3)), np.zeros((2, 3)), np.zeros(2))


def test_deadlocked_order_raises():
    order = {0: [Action("B", 0, 0), Action("F", 0, 0)], 1: [Action("F", 1, 0), Action("B", 1, 0)]}
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate_order(order, [0, 1], 1, np.ones((2, 3)))


# ------------------------------------------------------------------ full path (plan, topology, cost model)

MODEL = ModelConfig(vocab_size=64, d_model=64, n_layers=8, n_heads=4, ffn_hidden=128, max_seq_len=64)
MOE = MoEConfig(num_experts=8, top_k=2, expert_hidden=64)
TRAIN = TrainConfig(batch_size=16, seq_len=64)


def setup(pp=2, ep=2, m=4, v=1, name="1f1b", nodes=1, per_node=4, profile=None, dp=1):
    spec = build_model_spec(MODEL, MOE, TRAIN, microbatches=m, dp=dp, dtype_bytes=2)
    topo = from_config(TopologyConfig(nodes=nodes, devices_per_node=per_node, device_groups=[DeviceGroupConfig(count=nodes * per_node, tflops=0.01)],
                                      intra_node_bw_gbps=5.0, inter_node_bw_gbps=0.5, intra_node_latency_us=10, inter_node_latency_us=30))
    plan = static_plan(MODEL.n_layers, moe_layer_ids(MODEL, MOE), MOE.num_experts, pp=pp, ep=ep, virtual_stages=v, style=plan_style(name), dp=dp)
    return plan, topo, CostModel(spec, profile=profile)


def test_uniform_profile_full_path_matches_formula():
    # measured-profile costs: every block 1 ms per phase, nothing else -> uniform stages
    prof = {"device": {"tflops": 0.01}, "tokens_per_microbatch": 128,  # 16 x 64 tokens / 8 microbatches
            "layers": {str(i): {"fwd_s": 1e-3, "bwd_input_s": 1e-3, "bwd_weight_s": 1e-3} for i in range(8)},
            "embedding": {"fwd_s": 0, "bwd_s": 0}, "head": {"fwd_s": 0, "bwd_s": 0},
            "expert_per_token_s": {"fwd_s": 0, "bwd_s": 0}}
    p, m = 4, 8
    plan, topo, cm = setup(pp=p, ep=1, m=m, profile=prof)
    r = simulate(plan, "1f1b", m, topo, cm, free_comm=True)
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert r.iteration_time_s == pytest.approx((m + p - 1) * 2 * 3e-3)
    assert r.balanced_bound_s == pytest.approx(r.iteration_time_s)
    assert r.lower_bound_s == pytest.approx(m * 8 * 3e-3 / p)
    assert list(r.peak_inflight) == [4, 3, 2, 1]


def test_balanced_comm_bound_is_reached_by_an_even_plan_and_kept_under_skew():
    # EP pairs span nodes (one device per node): the free-communication bound is out of reach,
    # the one that keeps the unavoidable all-to-all, sends and gradient sync is met by the even plan
    prof = {"device": {"tflops": 0.01}, "tokens_per_microbatch": 256,
            "layers": {str(i): {"fwd_s": 1e-3, "bwd_input_s": 1e-3, "bwd_weight_s": 1e-3} for i in range(8)},
            "embedding": {"fwd_s": 0, "bwd_s": 0}, "head": {"fwd_s": 0, "bwd_s": 0},
            "expert_per_token_s": {"fwd_s": 1e-6, "bwd_s": 2e-6}}
    plan, topo, cm = setup(pp=2, ep=2, m=4, nodes=4, per_node=1, profile=prof)
    uni = simulate(plan, "1f1b", 4, topo, cm)
    assert uni.balanced_bound_s < uni.balanced_comm_bound_s * 0.9
    assert uni.balanced_comm_bound_s == pytest.approx(uni.iteration_time_s, rel=1e-3)  # embed/head grads differ by a norm
    skew = np.tile([20.0, 1, 1, 1, 1, 1, 1, 1], (len(cm.spec.moe_layers), 1))
    hot = simulate(plan, "1f1b", 4, topo, cm, routing=skew)
    assert hot.balanced_comm_bound_s == pytest.approx(uni.balanced_comm_bound_s)
    assert hot.iteration_time_s > hot.balanced_comm_bound_s * 1.2
    free = simulate(plan, "1f1b", 4, topo, cm, free_comm=True)
    assert free.balanced_comm_bound_s == pytest.approx(free.balanced_bound_s)


def test_bounds_imbalance_and_replicas():
    plan, topo, cm = setup(pp=2, ep=4, m=4, per_node=8)
    uni = simulate(plan, "1f1b", 4, topo, cm)
    assert uni.lower_bound_s <= uni.balanced_bound_s <= uni.balanced_comm_bound_s <= uni.iteration_time_s
    skew = np.tile([20.0, 1, 1, 1, 1, 1, 1, 1], (len(cm.spec.moe_layers), 1))
    hot = simulate(plan, "1f1b", 4, topo, cm, routing=skew)
    assert hot.iteration_time_s > uni.iteration_time_s * 1.5
    assert hot.balanced_bound_s == pytest.approx(uni.balanced_bound_s)  # bounds ignore imbalance
    for layer in plan.expert_map:  # replicate the hot expert everywhere
        plan.expert_map[layer][0] = [0, 1, 2, 3]
    rep = simulate(plan, "1f1b", 4, topo, cm, routing=skew)
    assert rep.iteration_time_s < hot.iteration_time_s
    assert hot.idle_fraction > uni.idle_fraction


def test_all_to_all_bytes_intra_vs_inter_node():
    plan, topo, cm = setup(pp=1, ep=4, m=2, nodes=1, per_node=4)
    one = simulate(plan, "1f1b", 2, topo, cm)
    assert one.a2a_bytes_inter_node == 0 and one.a2a_bytes_intra_node > 0
    plan2, topo2, cm2 = setup(pp=1, ep=4, m=2, nodes=2, per_node=2)
    two = simulate(plan2, "1f1b", 2, topo2, cm2)
    total = one.a2a_bytes_intra_node
    # uniform routing: each member receives equal parts from 3 peers, 1 on its node and 2 off it
    assert two.a2a_bytes_inter_node == pytest.approx(total * 2 / 3)
    assert two.a2a_bytes_intra_node == pytest.approx(total / 3)
    # bytes: layers x microbatches x (dispatch+combine) x (fwd+bwd) x tokens x top_k x 3/4 off-rank x d x 2 bytes
    tokens = 16 * 64 / 2
    assert total == pytest.approx(8 * 2 * 2 * 2 * tokens * 2 * 0.75 * 64 * 2)
    assert two.iteration_time_s > one.iteration_time_s


def test_peak_activation_bytes_per_rank():
    plan, topo, cm = setup(pp=2, ep=2, m=4)
    r = simulate(plan, "1f1b", 4, topo, cm)
    act = r.costs.act_bytes  # [stage, dp, ep]
    # rank layout: ep fastest -> global ranks 0,1 are stage 0 (2 in flight), 2,3 stage 1 (1 in flight)
    np.testing.assert_allclose(r.peak_activation_bytes, [2 * act[0, 0, 0], 2 * act[0, 0, 1], act[1, 0, 0], act[1, 0, 1]])


def test_deterministic_and_exports(tmp_path):
    plan, topo, cm = setup(pp=2, ep=2, m=4, v=2, name="interleaved_zb")
    skew = np.random.default_rng(0).random((len(cm.spec.moe_layers), 8))
    a = simulate(plan, "interleaved_zb", 4, topo, cm, routing=skew)
    b = simulate(plan, "interleaved_zb", 4, topo, cm, routing=skew)
    assert a.summary() == b.summary()
    for f in ("rank", "kind", "start", "end"):
        np.testing.assert_array_equal(getattr(a.timeline, f), getattr(b.timeline, f))
    a.write_trace(str(tmp_path / "trace.json"))
    a.write_gantt(str(tmp_path / "gantt.png"))
    tr = json.loads((tmp_path / "trace.json").read_text())
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert {e["cat"] for e in xs} >= {"F", "I", "W", "send", "recv", "a2a"}
    assert max(e["ts"] + e["dur"] for e in xs) == pytest.approx(a.pipeline_time_s * 1e6)
    assert (tmp_path / "gantt.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_schedule_mismatch_is_config_error():
    plan, topo, cm = setup(pp=2, ep=1, m=4, v=2, name="interleaved_1f1b")
    with pytest.raises(ConfigError, match="plan.stage_to_pp_rank"):
        simulate(plan, "zbv", 4, topo, cm)
    with pytest.raises(ConfigError, match="dualpipev"):
        simulate(static_plan(8, moe_layer_ids(MODEL, MOE), 8, pp=2, virtual_stages=2, style="v"), "dualpipev", 2, topo, cm)


def test_dp_replicas_and_grad_sync():
    plan, topo, cm = setup(pp=2, ep=1, m=4, dp=2)
    r = simulate(plan, "1f1b", 4, topo, cm)
    assert r.grad_sync_s > 0 and r.iteration_time_s == pytest.approx(r.pipeline_time_s + r.grad_sync_s)
    assert len(r.peak_activation_bytes) == 4
    free = simulate(plan, "1f1b", 4, free_topology(4, tflops=0.01), cm)
    assert free.grad_sync_s == 0


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2)])
def test_action_overhead_is_a_fixed_cost_per_action(name, v):
    # F/B-only orders: a per-action overhead o on zero compute is the same as F = B = o
    order, s2r = schedule_order(name, 2, v, 4)
    S = len(s2r)
    o = 0.3
    with_over = simulate_order(order, s2r, 4, np.zeros((S, 3)), send=[0.1] * S, overhead=o)
    as_comp = simulate_order(order, s2r, 4, np.tile([o, o, 0.0], (S, 1)), send=[0.1] * S)
    assert with_over.makespan == pytest.approx(as_comp.makespan)
    base = simulate_order(order, s2r, 4, np.ones((S, 3)))
    assert simulate_order(order, s2r, 4, np.ones((S, 3)), overhead=[0.0, 0.0]).makespan == pytest.approx(base.makespan)
    assert simulate_order(order, s2r, 4, np.ones((S, 3)), overhead=o).makespan > base.makespan


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev"])
def test_fit_action_overhead_recovers_a_known_overhead(name):
    from moepipe.sim.calibrate import fit_action_overhead

    v = 1 if name in ("gpipe", "1f1b") else 2
    order, s2r = schedule_order(name, 2, v, 8)
    S = len(s2r)
    send = [2e-4 if s2r[s] != s2r[s + 1] else 0.0 for s in range(S - 1)] + [0.0]
    measured = simulate_order(order, s2r, 8, np.zeros((S, 3)), send=send, overhead=7e-4).makespan
    assert fit_action_overhead(name, 2, v, 8, measured, send=send) == pytest.approx(7e-4, rel=1e-3)
    assert fit_action_overhead(name, 2, v, 8, 1e-6, send=send) == 0.0  # faster than the transfers alone: no overhead


def test_simulate_action_overhead_default_keeps_numbers():
    plan, topo, cm = setup()
    a = simulate(plan, "1f1b", 4, topo, cm)
    b = simulate(plan, "1f1b", 4, topo, cm, action_overhead_s=0.0)
    assert a.iteration_time_s == b.iteration_time_s
    c = simulate(plan, "1f1b", 4, topo, cm, action_overhead_s=1e-3)
    assert c.iteration_time_s > a.iteration_time_s


def test_comm_cpu_is_spread_over_each_ranks_actions():
    from moepipe.sim.calibrate import actions_per_rank, comm_cpu_per_action

    assert actions_per_rank("1f1b", 2, 1, 4) == [8, 8]
    assert actions_per_rank("interleaved_zb", 2, 2, 4) == [24, 24]  # F, I, W per chunk per microbatch
    assert comm_cpu_per_action("1f1b", 2, 1, 4, [8e-3, 4e-3]) == pytest.approx([1e-3, 5e-4])
