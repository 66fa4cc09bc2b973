"""Nearest-replica routing (cost_model.split_over_copies): the rule the EP dispatcher runs and the
simulator models; token origins and the hierarchical all-to-all in the cost model."""
import numpy as np
import pytest
import torch

from moepipe.config import ConfigError, DeviceGroupConfig, TopologyConfig
from moepipe.model.routing_stats import RoutingStats
from moepipe.placement.cost_model import copy_table, exchange_traffic, layer_exchange, rule_nodes, split_over_copies
from moepipe.placement.plan import Plan
from moepipe.placement.placers import Evaluator, make_placement
from moepipe.placement.placers.inputs import origins_of, routing_of
from moepipe.placement.topology import from_config
from moepipe.placement.workloads import expert_distribution, origin_distribution, routing_origins
from moepipe.sim import simulate

from test_placers import inputs, skew, topology

LOCAL_HOT = "moepipe.placement.workloads:local_hot"


def test_own_rank_first_then_own_node_then_by_load():
    # 4 EP ranks as 2 nodes x 2; expert 0 on ranks 0, 1 (node 0); expert 1 on ranks 1, 2, 3
    t = copy_table([[0, 1], [1, 2, 3]], rule_nodes(4, 2))
    counts = np.array([[5, 4], [2, 3], [0, 6], [7, 1]])
    a = split_over_copies(counts, t)
    assert a.sum(-1).tolist() == counts.tolist()  # every token goes somewhere
    assert a[0, 0].tolist() == [5, 0, 0] and a[1, 0].tolist() == [0, 2, 0]  # own copies (the table pads to 3 copies)
    # node 1 has no copy of expert 0: its 7 tokens water-fill the copies (loads 5 and 2) to 7 and 7
    assert a[2, 0].tolist() == [0, 0, 0] and a[3, 0].tolist() == [2, 5, 0]
    # expert 1: ranks 1, 2, 3 keep their own; rank 0 goes to rank 1, the copy in its node
    assert a[0, 1].tolist() == [4, 0, 0] and a[1, 1].tolist() == [3, 0, 0] and a[2, 1].tolist() == [0, 6, 0] and a[3, 1].tolist() == [0, 0, 1]


def test_spread_by_load_integer_remainder_and_every_rank_alike():
    t = copy_table([[0, 1, 2]], rule_nodes(4, 1))  # every rank its own node; rank 3 has no copy
    a = split_over_copies(np.array([[4], [1], [0], [8]]), t)
    # loads 4, 1, 0 plus 8 tokens: level 13/3 -> 4, 4, 5 (the remainder to the lowest loaded copy)
    assert (a[:3, 0].sum(0) + a[3, 0]).tolist() == [4, 4, 5] and a[3, 0].tolist() == [0, 3, 5]
    rng = np.random.default_rng(0)
    holders = [[0], [1, 3], [0, 2, 3], [2], [0, 1, 2, 3], [3, 1]]
    tab = copy_table(holders, rule_nodes(4, 2))
    for _ in range(20):
        c = rng.integers(0, 50, size=(4, len(holders)))
        a = split_over_copies(c, tab)
        assert (a >= 0).all() and a.sum(-1).tolist() == c.tolist()
        # torch on the device path gives the same integers; floats give the same rule (no rounding)
        got = split_over_copies(torch.as_tensor(c), tab.to(torch.as_tensor))
        assert got.tolist() == a.tolist()
        f = split_over_copies(c.astype(np.float64), tab)
        assert np.allclose(f.sum(-1), c) and np.abs(f - a).max() <= 1.0 + 1e-9


def test_bad_holders_are_a_one_line_error():
    with pytest.raises(ConfigError, match="expert_map"):
        copy_table([[0, 0]], rule_nodes(2, 1))
    with pytest.raises(ConfigError, match="expert_map"):
        copy_table([[2]], rule_nodes(2, 1))


def test_routing_stats_count_origins_in_their_row():
    s = RoutingStats(4, source=1, n_sources=3)
    s.add(torch.tensor([1, 0, 2, 3]), torch.tensor([1, 0, 2, 3]))
    s.add(torch.tensor([0, 5, 0, 0]), torch.tensor([0, 4, 0, 0]))
    h = s.host()
    assert h.origins.tolist() == [[0, 0, 0, 0], [1, 5, 2, 3], [0, 0, 0, 0]] and h.origins.sum(0).tolist() == h.demand.tolist()
    assert RoutingStats(4).host().origins.shape == (1, 4)  # one process: the single source


def test_local_hot_skews_origins_not_the_total():
    E, ep = 16, 4
    o = origin_distribution(LOCAL_HOT, 0, 1, E, ep=ep, strength=5.0)
    assert o.shape == (ep, E) and np.allclose(o.sum(1), 1)
    assert all(np.isclose(row.max() / row.min(), 5.0) for row in o)
    assert np.allclose(o.mean(0), expert_distribution(LOCAL_HOT, 0, 1, E, ep=ep, strength=5.0))
    assert np.allclose(o.mean(0), 1 / E)  # E divisible by ep: the whole job sees uniform load
    # workloads without `source` give every rank the same distribution (numerics unchanged)
    z = origin_distribution("zipf", 0, 1, E, ep=ep)
    assert all(np.array_equal(r, expert_distribution("zipf", 0, 1, E, ep=ep)) for r in z)


def _plan_with_replicas(inp, maps):
    base = make_placement("static", inp)
    return Plan(base.stage_layers, base.stage_to_pp_rank, {l: maps for l in inp.spec.moe_layers}, inp.pp, inp.ep, inp.dp)


def test_uniform_origins_and_no_replicas_reproduce_the_even_model():
    inp = inputs(pp=2, ep=4, dp=1, n_layers=4, topo=topology(2, 4))
    inp.expert_load = skew(inp)
    plan = make_placement("static", inp)
    even = {l: np.ones((4, 8)) for l in inp.spec.moe_layers}
    a = simulate(plan, "1f1b", 4, inp.topology, inp.cost_model, routing_of(inp))
    b = simulate(plan, "1f1b", 4, inp.topology, inp.cost_model, routing_of(inp), origins=even)
    assert np.isclose(a.iteration_time_s, b.iteration_time_s, rtol=1e-12)
    assert np.isclose(a.a2a_bytes_inter_node, b.a2a_bytes_inter_node, rtol=1e-12)
    assert np.isclose(a.a2a_bytes_intra_node, b.a2a_bytes_intra_node, rtol=1e-12)


@pytest.mark.parametrize("a2a", ["flat", "hierarchical"])
def test_evaluator_matches_the_simulator_with_origins_and_replicas(a2a):
    inp = inputs(pp=2, ep=4, dp=2, n_layers=6, topo=topology(8, 2))  # nodes of 2: every EP group spans 2 nodes
    inp.cost_model.a2a = a2a
    inp.expert_load = skew(inp)
    inp.origins = routing_origins(LOCAL_HOT, 0, inp.spec.moe_layers, 8, 1000, 2, ep=4, strength=6.0)
    plan = _plan_with_replicas(inp, [[0, 2], [1], [2, 3], [3], [0], [1, 3], [2], [3, 0]])
    sim = simulate(plan, "1f1b", 4, inp.topology, inp.cost_model, routing_of(inp), origins=origins_of(inp))
    ev = Evaluator(inp).evaluate(plan)
    assert np.isclose(ev.iteration_time_s, sim.iteration_time_s, rtol=1e-12)
    assert np.allclose(ev.act_bytes, sim.peak_activation_bytes, rtol=1e-12)


def test_home_experts_cut_inter_node_bytes_under_origin_skew():
    inp = inputs(pp=1, ep=4, dp=1, n_layers=2, topo=topology(2, 2))
    o = routing_origins(LOCAL_HOT, 0, inp.spec.moe_layers, 8, 1000, 2, ep=4, strength=20.0)
    # each expert on the rank whose data prefers it (the blocks are shuffled per layer)
    home = {l: [[int(np.argmax(o[l][:, e]))] for e in range(8)] for l in inp.spec.moe_layers}
    base = make_placement("static", inp)
    static = simulate(base, "1f1b", 4, inp.topology, inp.cost_model, origins=o)
    homed = simulate(Plan(base.stage_layers, base.stage_to_pp_rank, home, 1, 4, 1), "1f1b", 4, inp.topology, inp.cost_model, origins=o)
    assert homed.a2a_bytes_inter_node < 0.25 * static.a2a_bytes_inter_node
    assert homed.iteration_time_s < static.iteration_time_s


def test_hierarchical_bytes_and_messages_by_hand():
    # 4 ranks as 2 nodes x 2, one byte from every rank to every other rank
    topo = from_config(TopologyConfig(name="t", nodes=2, devices_per_node=2, device_groups=[DeviceGroupConfig(count=4, name="g", tflops=1.0, memory_gb=1.0)],
                                      intra_node_bw_gbps=100.0, inter_node_bw_gbps=10.0))
    b = np.ones((4, 4)) - np.eye(4)
    flat = exchange_traffic(b, b.sum(0), [0, 1, 2, 3], topo, "flat")
    assert flat == (4.0, 8.0, 4, 8)  # 4 intra pairs, 8 inter pairs, one message each
    hier = exchange_traffic(b, b.sum(0), [0, 1, 2, 3], topo, "hierarchical")
    # phase 1: s hands its node peer what goes to that local index in both nodes (1 + 1 bytes,
    # 4 messages); phase 2: each rank forwards to its counterpart 2 bytes (its own + its peer's), 4 messages
    assert hier == (8.0, 8.0, 4, 4)


def test_layer_exchange_counts_what_each_rank_receives():
    # expert 0 on ranks 0 and 1 (one node of 2), expert 1 on rank 1; all tokens start on rank 0
    routed, tok = layer_exchange([[0, 1], [1]], np.array([0.5, 0.5]), 100.0, rule_nodes(2, 2), np.array([[1.0, 1.0], [0.0, 0.0]]))
    assert routed.tolist() == [50.0, 50.0] and tok.tolist() == [[50.0, 50.0], [0.0, 0.0]]
