"""The fast path's decision (moepipe/placement/shadows.py): the rule on a case computed by
hand, the slot bound, determinism, and agreement with the cost model when no shadows are given.
Speed is measured by experiments/bench_shadows.py, not here."""
from __future__ import annotations

import numpy as np
import pytest

from moepipe.config import ConfigError, compose_config
from moepipe.placement.placers import Evaluator, inputs_from_config, make_placement
from moepipe.placement.placers.inputs import PlacementInputs
from moepipe.placement.plan import Plan, rank_grid
from moepipe.placement.shadows import (
    ShadowLayer, choose_shadows, layer_setup, layer_step_time, shadow_transfer_s, shadowed_expert_map, transfer_matrix,
)
from moepipe.placement.topology import from_config


def two_rank_layer(bw_gbps: float, *, m=4, A=1000.0, B=1000.0, s_per_token=1e-6, P=1e8, G=1e8, nodes=1) -> ShadowLayer:
    """2 EP ranks, no dense part, one routed expert costs s_per_token per token per phase, A
    assignments per microbatch of B bytes each, expert weights P and gradient G bytes."""
    per = 2 // nodes
    topo = from_config({"nodes": nodes, "devices_per_node": per, "device_groups": [{"count": 2, "name": "x", "tflops": 1.0, "memory_gb": 1.0}],
                        "intra_node_bw_gbps": bw_gbps, "inter_node_bw_gbps": bw_gbps, "intra_node_latency_us": 0.0, "inter_node_latency_us": 0.0})
    rate = np.array([1e12, 1e12])
    w = s_per_token * 1e12
    return ShadowLayer(topology=topo, group=np.array([0, 1]), dense_s=np.zeros((3, 2)), expert_s=np.full((3, 2), s_per_token),
                       dense_work=np.zeros(3), expert_work=np.full(3, w), tokens=0.0, rate=rate, assign=A, bytes_per_token=B,
                       microbatches=m, checkpointing=False, a2a="flat", weight_bytes=P, grad_bytes=G, rule_nodes=np.array([0, 0 if nodes == 1 else 1]))


def hand_net(bw: float, m=4, A=1000.0, B=1000.0, s=1e-6, P=1e8, G=1e8) -> tuple[float, float]:
    """(saved, transfer) per step of a shadow of expert 0 (all the load, home rank 0) on rank 1.
    Without it rank 0 computes A tokens in F, B and W (3As) and receives the A/2 that start on
    rank 1 in the dispatch and sends them back in the combine, in F and B (2 * 2 * (A/2)B/bw).
    With it each rank serves the tokens that start on it: 3(A/2)s and no all-to-all traffic."""
    before = 3 * A * s + 4 * (A / 2) * B / bw
    after = 3 * (A / 2) * s
    return m * (before - after), P / bw + G / bw


def test_rule_by_hand_fast_link_shadows():
    lay = two_rank_layer(100.0)
    ch = choose_shadows([1.0, 0.0], [[0], [1]], lay, shadow_slots=1)
    saved, transfer = hand_net(100e9)
    assert saved > transfer  # the case is one where the shadow pays
    assert ch.shadows == {0: (1,)}
    assert ch.saved_s == pytest.approx(saved, rel=1e-12)
    assert ch.transfer_s == pytest.approx(transfer, rel=1e-12)


def test_rule_by_hand_slow_link_no_shadow():
    lay = two_rank_layer(10.0)
    saved, transfer = hand_net(10e9)
    assert saved < transfer
    assert choose_shadows([1.0, 0.0], [[0], [1]], lay, shadow_slots=1).shadows == {}
    # the exact evaluation of that shadow agrees with the hand figures, and says it does not pay
    t0 = layer_step_time(lay, [[0], [1]], [1.0, 0.0])
    t1 = layer_step_time(lay, [[0], [1]], [1.0, 0.0], {0: (1,)})
    assert t0.step_s - (t1.step_s - t1.transfer_s) == pytest.approx(saved, rel=1e-12)
    assert t1.transfer_s == pytest.approx(transfer, rel=1e-12)
    assert t1.step_s > t0.step_s


def test_breakeven_moves_with_microbatches():
    # more microbatches per step amortise the one broadcast + gradient return per step
    bw = 20.0
    assert choose_shadows([1.0, 0.0], [[0], [1]], two_rank_layer(bw, m=4), 1).shadows == {}
    assert choose_shadows([1.0, 0.0], [[0], [1]], two_rank_layer(bw, m=64), 1).shadows == {0: (1,)}


def test_no_slots_no_shadows():
    lay = two_rank_layer(100.0)
    assert choose_shadows([1.0, 0.0], [[0], [1]], lay, shadow_slots=0).shadows == {}
    with pytest.raises(ConfigError, match="shadow_slots"):
        choose_shadows([1.0, 0.0], [[0], [1]], lay, shadow_slots=-1)


def test_transfer_uses_link_class():
    # the same pair on one node (NVLink) or across nodes (NIC): bytes / that link's bandwidth
    one = two_rank_layer(100.0)
    assert shadow_transfer_s(one, [[0], [1]], {0: (1,)}) == pytest.approx((1e8 + 1e8) / 100e9)
    topo = from_config({"nodes": 2, "devices_per_node": 1, "device_groups": [{"count": 2, "name": "x", "tflops": 1.0, "memory_gb": 1.0}],
                        "intra_node_bw_gbps": 400.0, "inter_node_bw_gbps": 25.0, "inter_node_latency_us": 10.0})
    two = ShadowLayer(topology=topo, group=np.array([0, 1]), dense_s=one.dense_s, expert_s=one.expert_s, dense_work=one.dense_work,
                      expert_work=one.expert_work, tokens=0.0, rate=one.rate, assign=one.assign, bytes_per_token=one.bytes_per_token,
                      microbatches=one.microbatches, checkpointing=False, a2a="flat", weight_bytes=1e8, grad_bytes=5e7, rule_nodes=np.array([0, 1]))
    assert shadow_transfer_s(two, [[0], [1]], {0: (1,)}) == pytest.approx(2 * 10e-6 + (1e8 + 5e7) / 25e9)
    np.testing.assert_array_equal(transfer_matrix([[0], [1]], {0: (1,)}, 2), [[0, 1], [0, 0]])


# ------------------------------------------------------------------ on a real job's cost model


def job(overrides):
    cfg = compose_config(overrides + ["train.seq_len=1024"])
    return inputs_from_config(cfg)


NVLINK = ["topology=nvlink_8gpu", "model=deepseek_v2_lite", "parallel.pp=2", "parallel.ep=4", "parallel.dp=1",
          "schedule=1f1b", "schedule.microbatches=8", "train.batch_size=32"]
IB = ["topology=ib_4x8", "model=deepseek_v2_lite", "parallel.pp=1", "parallel.ep=16", "parallel.dp=2",
      "schedule=1f1b", "schedule.microbatches=4", "train.batch_size=128"]


def skewed_load(inp, seed):
    rng = np.random.default_rng(seed)
    return {l: np.exp(1.5 * rng.standard_normal(inp.spec.num_experts)) for l in inp.spec.moe_layers}


@pytest.mark.parametrize("overrides", [NVLINK, IB], ids=["nvlink", "ib"])
def test_no_shadows_equals_cost_model(overrides):
    base = job(overrides)
    load = skewed_load(base, 0)
    inp = PlacementInputs(**{**base.__dict__, "expert_load": load})
    ev = Evaluator(inp)
    for placer, slots in (("static", 0), ("eplb", 1)):
        plan = make_placement(placer, inp, replica_slots=slots)
        routed, tokens = ev.exchanges(plan)
        comp_l, a2a_l = ev.layer_times(routed, tokens)
        grid = rank_grid(plan.pp, plan.ep, plan.dp)
        for l in inp.spec.moe_layers:
            p = plan.stage_to_pp_rank[plan.stage_of_layer(l)]
            for d in range(plan.dp):
                lay = layer_setup(inp.cost_model, inp.topology, grid[p, d], l, inp.microbatches)
                t = layer_step_time(lay, plan.expert_map[l], load[l])
                assert t.transfer_s == 0.0
                if slots == 0:  # bit-identical, not approximately
                    np.testing.assert_array_equal(t.comp, comp_l[l, p, :, d])
                    np.testing.assert_array_equal(t.a2a[:2], [a2a_l[l, p, d]] * 2)
                else:  # replicas: the evaluator takes the rule's closed form for even origins (cost_model.uniform_exchanges)
                    np.testing.assert_allclose(t.comp, comp_l[l, p, :, d], rtol=1e-12)
                    np.testing.assert_allclose(t.a2a[:2], [a2a_l[l, p, d]] * 2, rtol=1e-12)
                assert t.a2a[2] == 0.0
        # the plan with an empty shadow map is the plan
        aug = Plan(plan.stage_layers, plan.stage_to_pp_rank, shadowed_expert_map(plan.expert_map, {}), plan.pp, plan.ep, plan.dp)
        assert Evaluator(inp).evaluate(aug).iteration_time_s == ev.evaluate(plan).iteration_time_s


def test_shadows_as_copies_match_the_evaluator():
    # a shadow is a copy for the tokens: the layer's compute and all-to-all with shadows equal
    # the Evaluator's on the plan whose expert map lists them
    inp0 = job(NVLINK)
    load = skewed_load(inp0, 1)
    inp = PlacementInputs(**{**inp0.__dict__, "expert_load": load})
    plan = make_placement("static", inp)
    grid = rank_grid(plan.pp, plan.ep, plan.dp)
    shadows = {}
    for l in inp.spec.moe_layers:
        p = plan.stage_to_pp_rank[plan.stage_of_layer(l)]
        lay = layer_setup(inp.cost_model, inp.topology, grid[p, 0], l, inp.microbatches)
        shadows[l] = choose_shadows(load[l], plan.expert_map[l], lay, 1).shadows
    assert any(shadows.values())  # the skewed load makes some pay
    aug = Plan(plan.stage_layers, plan.stage_to_pp_rank, shadowed_expert_map(plan.expert_map, shadows), plan.pp, plan.ep, plan.dp)
    ev = Evaluator(inp)
    routed, tokens = ev.exchanges(aug)
    comp_l, a2a_l = ev.layer_times(routed, tokens)
    for l in inp.spec.moe_layers:
        p = plan.stage_to_pp_rank[plan.stage_of_layer(l)]
        lay = layer_setup(inp.cost_model, inp.topology, grid[p, 0], l, inp.microbatches)
        t = layer_step_time(lay, plan.expert_map[l], load[l], shadows[l])
        np.testing.assert_allclose(t.comp, comp_l[l, p, :, 0], rtol=1e-12)
        np.testing.assert_allclose(t.a2a[0], a2a_l[l, p, 0], rtol=1e-12)
        assert (t.transfer_s > 0) == bool(shadows[l])


@pytest.mark.parametrize("slots", [1, 2])
def test_slot_bound_and_distinct_ranks(slots):
    inp = job(IB)
    lay = layer_setup(inp.cost_model, inp.topology, range(16), inp.spec.moe_layers[0], inp.microbatches)
    E = inp.spec.num_experts
    holders = [[e * 16 // E] for e in range(E)]
    seen_any = False
    for seed in range(6):
        load = np.exp(2.0 * np.random.default_rng(seed).standard_normal(E))
        ch = choose_shadows(load, holders, lay, slots)
        per_rank = np.zeros(16, dtype=int)
        for e, rs in ch.shadows.items():
            assert len(set(rs)) == len(rs) and holders[e][0] not in rs  # never a second copy on a rank
            for r in rs:
                per_rank[r] += 1
        assert per_rank.max(initial=0) <= slots
        assert ch.net_s > 0 or not ch.shadows
        seen_any |= bool(ch.shadows)
    assert seen_any


def test_deterministic_and_capped():
    inp = job(IB)
    lay = layer_setup(inp.cost_model, inp.topology, range(16), inp.spec.moe_layers[0], inp.microbatches)
    E = inp.spec.num_experts
    holders = [[e * 16 // E] for e in range(E)]
    load = np.exp(2.0 * np.random.default_rng(3).standard_normal(E))
    a = choose_shadows(load, holders, lay, 2)
    b = choose_shadows(load.copy(), [list(h) for h in holders], lay, 2)
    assert a.shadows == b.shadows and a.saved_s == b.saved_s and a.transfer_s == b.transfer_s
    assert choose_shadows(load, holders, lay, 2, max_candidates=1).candidates <= 1
    # proportions only: the same load at another scale decides the same
    assert choose_shadows(load * 37.0, holders, lay, 2).shadows == a.shadows


def test_origins_load_accepted():
    inp = job(IB)
    lay = layer_setup(inp.cost_model, inp.topology, range(16), inp.spec.moe_layers[0], inp.microbatches)
    E = inp.spec.num_experts
    holders = [[e * 16 // E] for e in range(E)]
    load = np.exp(2.0 * np.random.default_rng(4).standard_normal(E))
    even = np.tile(load / 16, (16, 1))  # every source alike: the same as the [E] load
    assert choose_shadows(even, holders, lay, 1).shadows == choose_shadows(load, holders, lay, 1).shadows
    with pytest.raises(ConfigError, match="load has shape"):
        choose_shadows(np.ones((3, E)), holders, lay, 1)


def test_shadowed_iteration_in_the_evaluator():
    # the simulator's option (placement/shadow_eval.py): no shadows is the Evaluator's own
    # time; with the runtime's decision on a skewed load it is the shadowed map's pipeline, the
    # plan's own gradient all-reduce and one exchange per pipeline rank each way for all its
    # layers (cheaper than a separate exchange per layer: the latencies are paid once)
    from moepipe.placement.shadow_eval import choose_for_plan, shadowed_iteration_s, step_transfer_s

    inp0 = job(NVLINK)
    load = skewed_load(inp0, 1)
    inp = PlacementInputs(**{**inp0.__dict__, "expert_load": load})
    plan = make_placement("static", inp)
    ev = Evaluator(inp)
    base = ev.evaluate(plan).iteration_time_s
    assert shadowed_iteration_s(ev, plan, {}) == base
    shadows = choose_for_plan(ev, plan, load, 1)
    assert any(shadows.values()) and all(len(rs) == len(set(rs)) for s in shadows.values() for rs in s.values())
    x = step_transfer_s(ev, plan, shadows)
    grid = rank_grid(plan.pp, plan.ep, plan.dp)
    per_layer = []
    for l, s in shadows.items():
        if s:
            p = plan.stage_to_pp_rank[plan.stage_of_layer(l)]
            per_layer.append((p, shadow_transfer_s(layer_setup(ev.cm, ev.topo, grid[p, 0], l, inp.microbatches), plan.expert_map[l], s)))
    by_rank = [sum(t for q, t in per_layer if q == p) for p in range(plan.pp)]
    assert max(t for _, t in per_layer) <= x < max(by_rank)
    aug = Plan(plan.stage_layers, plan.stage_to_pp_rank, shadowed_expert_map(plan.expert_map, shadows), plan.pp, plan.ep, plan.dp)
    want = ev.evaluate(aug).iteration_time_s - ev.grad_sync(aug) + ev.grad_sync(plan) + x
    assert shadowed_iteration_s(ev, plan, shadows) == pytest.approx(want, rel=1e-12)
    assert shadowed_iteration_s(ev, plan, shadows) < base  # the skew pays for them on NVLink


def test_decision_scores_both_plans_with_the_shadows_the_runtime_picks():
    # placer.shadow_slots > 0: decide() scores the current and the proposed plan with per-step
    # shadows (shadow_eval.time_with_shadows); a hot expert the shadows already spread shows
    # (almost) no gain, so the hysteresis keeps the layout the plain decision would move
    from moepipe.placement.placers import decide
    from moepipe.placement.shadow_eval import choose_for_plan, decision_load, shadowed_iteration_s, time_with_shadows

    inp0 = job(NVLINK)
    E = inp0.spec.num_experts
    load = {l: np.where(np.arange(E) == (3 * l) % E, 40.0, 1.0) for l in inp0.spec.moe_layers}  # one hot expert per layer
    inp = PlacementInputs(**{**inp0.__dict__, "expert_load": load})
    current = make_placement("static", inp)
    ev = Evaluator(inp)
    # the score is shadowed_iteration_s with choose_for_plan's shadows on the evaluator's load
    assert all(np.array_equal(decision_load(ev, l), load[l]) for l in load)
    want = shadowed_iteration_s(ev, current, choose_for_plan(ev, current, load, 1))
    assert time_with_shadows(ev, current, 1) == want < ev.evaluate(current).iteration_time_s
    # (the plain decision predicts ~40% saved per step, the shadowed one under 5%)
    plain = decide("topo", inp, current, 1, horizon_steps=100, min_gain_frac=0.05)
    shadowed = decide("topo", inp, current, 1, horizon_steps=100, min_gain_frac=0.05, shadow_slots=1)
    assert plain.migrate, plain.reason
    assert shadowed.predicted_old_s == pytest.approx(want, rel=1e-12)
    assert shadowed.predicted_old_s - shadowed.predicted_new_s < plain.predicted_old_s - plain.predicted_new_s
    assert not shadowed.migrate and "min_gain_frac" in shadowed.reason and shadowed.plan == current
    # origins known: the decision reads [ep, E] counts split in the origins' proportions
    o = {l: np.stack([np.full(E, 3.0), np.full(E, 1.0), np.zeros(E), np.zeros(E)]) for l in load}
    ev_o = Evaluator(PlacementInputs(**{**inp.__dict__, "origins": o}))
    l0 = inp.spec.moe_layers[0]
    assert np.allclose(decision_load(ev_o, l0), np.stack([0.75 * load[l0], 0.25 * load[l0], 0 * load[l0], 0 * load[l0]]))
