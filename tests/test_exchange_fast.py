"""The placers' fast forms of the nearest-replica rule equal the general rule
(cost_model.layer_exchange / exchange_time / exchange_traffic) to rounding, on random plans."""
import numpy as np
import pytest

from moepipe.config import ConfigError

from moepipe.placement.cost_model import _NumpyOps, _waterfill, copy_table, split_over_copies, exchange_time, exchange_traffic, layer_exchange, rule_nodes, uniform_exchanges, uniform_links, class_sums_time
from moepipe.placement.plan import Plan
from moepipe.placement.placers import Evaluator, make_placement

from test_placers import inputs, topology


def random_holders(rng, E, ep, max_copies):
    """Every expert on 1..max_copies distinct EP ranks, in random order; some experts unused."""
    return [list(rng.choice(ep, size=int(rng.integers(1, max_copies + 1)), replace=False)) for _ in range(E)]


@pytest.mark.parametrize("ep,local", [(8, 4), (8, 2), (6, 4), (4, 1), (4, 8), (16, 4)])
def test_uniform_closed_form_equals_the_general_rule(ep, local):
    rng = np.random.default_rng(ep * 10 + local)
    topo = topology(max(1, -(-ep // local)), local) if ep >= local else topology(1, local)
    g = np.arange(ep)
    nodes = rule_nodes(ep, local)
    links = uniform_links(topo, g, nodes)
    assert links is not None
    E, n = 12, 20
    maps = [random_holders(rng, E, ep, 3) for _ in range(n)]
    frac = rng.dirichlet(np.full(E, 0.7), size=n)
    frac[rng.random((n, E)) < 0.15] = 0.0  # experts nobody routes to
    frac[0] = 1.0 / E
    maps[1] = [[int(e % ep)] for e in range(E)]  # a layer without replicas: the even pattern
    assign = 4096.0
    routed, sums = uniform_exchanges(maps, frac, assign, nodes)
    bpt = 7168.0
    t_fast = class_sums_time([s for s in sums if s is not None], bpt, links)
    j = 0
    for i in range(n):
        r, tok = layer_exchange(maps[i], frac[i], assign, nodes)
        np.testing.assert_allclose(routed[i], r, rtol=1e-12, atol=1e-9)
        if tok is None:
            assert sums[i] is None
            continue
        t = exchange_time(tok * bpt, r * bpt, g, topo)
        assert t_fast[j] == pytest.approx(t, rel=1e-12)
        ib, xb = exchange_traffic(tok * bpt, r * bpt, g, topo)[:2]
        assert float(sums[i].send[0].sum()) * bpt == pytest.approx(ib, rel=1e-12, abs=1e-6)
        assert float(sums[i].send[1].sum()) * bpt == pytest.approx(xb, rel=1e-12, abs=1e-6)
        j += 1


def _layer_tokens_add_at(holders, frac, assign, nodes, share):
    """layer_exchange's token matrix accumulated with np.add.at (its earlier form), the reference."""
    ep, E = len(nodes), len(holders)
    counts = (np.full((ep, E), 1.0 / ep) if share is None else share) * frac[None, :] * assign
    single = np.array([len(h) == 1 for h in holders])
    tokens = np.zeros((ep, ep))
    if single.any():
        np.add.at(tokens.T, np.array([h[0] for h, o in zip(holders, single) if o]), counts[:, single].T)
    rep = np.flatnonzero(~single)
    if len(rep):
        table = copy_table([holders[e] for e in rep], nodes)
        split = split_over_copies(counts[:, rep], table)
        np.add.at(tokens, (np.broadcast_to(np.arange(ep)[:, None, None], split.shape), np.broadcast_to(table.slot[None], split.shape)), split)
    return tokens


def test_layer_exchange_accumulates_as_add_at():
    # one bincount in the same order of additions: the same bits as the two np.add.at passes
    rng = np.random.default_rng(5)
    for t in range(40):
        ep, local = [(4, 2), (8, 4), (16, 8), (6, 4)][t % 4]
        E = int(rng.integers(ep, 3 * ep))
        holders = random_holders(rng, E, ep, 1 + t % 3)
        frac = rng.dirichlet(np.full(E, 0.5))
        share = None if t % 2 else rng.dirichlet(np.full(ep, 0.7), size=E).T
        routed, tok = layer_exchange(holders, frac, 4096.0, rule_nodes(ep, local), share)
        if tok is None:
            continue
        ref = _layer_tokens_add_at(holders, frac, 4096.0, rule_nodes(ep, local), share)
        assert np.array_equal(tok, ref) and np.array_equal(routed, ref.sum(0))


def test_copy_table_slots_and_refusals():
    rng = np.random.default_rng(6)
    for t in range(20):
        ep = int(rng.integers(3, 9))
        holders = random_holders(rng, int(rng.integers(1, 12)), ep, 3)
        tab = copy_table(holders, rule_nodes(ep, 2))
        W = max(map(len, holders))
        assert tab.slot.tolist() == [list(map(int, h)) + [int(h[0])] * (W - len(h)) for h in holders]
        assert tab.valid.tolist() == [[k < len(h) for k in range(W)] for h in holders]
    for bad in ([[0], []], [[0, 0]], [[0], [4]], [[-1]], []):
        with pytest.raises(ConfigError, match="distinct EP ranks"):
            copy_table(bad, rule_nodes(4, 2))


def test_single_copy_pool_is_the_water_fill_of_one_copy():
    # uniform_exchanges gives a single-copy expert its whole pool without the water-fill: the same
    # arithmetic, so the same bits (zeros and empty pools included)
    rng = np.random.default_rng(3)
    load = rng.random(400) * rng.integers(0, 2, 400) * 1e3
    pool = rng.random(400) * rng.integers(0, 2, 400) * 1e4
    ref = _waterfill(_NumpyOps, load[:, None], np.ones((400, 1), dtype=bool), pool, False)[:, 0]
    tot = pool + load
    assert np.array_equal(np.where(0 < tot, tot - load, 0.0), ref)


def test_uniform_links_refuses_mixed_links_and_foreign_nodes():
    topo = topology(2, 4)
    assert uniform_links(topo, np.arange(8), rule_nodes(8, 2)) is None  # the rule's nodes are not the group's
    bw = topo.bandwidth.copy()
    bw[0, 1] = bw[1, 0] = bw[0, 1] / 2
    topo2 = type(topo)(topo.name, topo.devices, bw, topo.latency)
    assert uniform_links(topo2, np.arange(8), rule_nodes(8, 4)) is None
    assert uniform_links(topo, np.arange(8), rule_nodes(8, 4)) is not None


@pytest.mark.parametrize("placer", ["eplb", "topo"])
def test_evaluator_fast_path_equals_the_general_rule(placer):
    inp = inputs(pp=2, ep=8, dp=2, n_layers=6, experts=16, topo=topology(8, 4))  # EP groups over 2 nodes
    rng = np.random.default_rng(3)
    inp.expert_load = {l: rng.lognormal(0, 1.2, 16) for l in inp.spec.moe_layers}
    fast = Evaluator(inp)
    assert fast.class_links is not None
    slow = Evaluator(inp)
    slow.class_links = None
    plan = make_placement(placer, inp, replica_slots=2)
    assert any(len(h) > 1 for m in plan.expert_map.values() for h in m)
    a, b = fast.evaluate(plan), slow.evaluate(plan)
    assert a.iteration_time_s == pytest.approx(b.iteration_time_s, rel=1e-12)
    np.testing.assert_allclose(a.act_bytes, b.act_bytes, rtol=1e-12)
    for k, v in slow.traffic(plan).items():
        assert fast.traffic(plan)[k] == pytest.approx(v, rel=1e-12)
    np.testing.assert_allclose(fast.routed(plan), slow.routed(plan), rtol=1e-12)


@pytest.mark.parametrize("ep,local", [(8, 2), (6, 4), (12, 4), (16, 8)])
def test_split_in_node_blocks_is_the_per_node_rule_bit_for_bit(ep, local, monkeypatch):
    import moepipe.placement.cost_model as cm

    rng = np.random.default_rng(ep + local)
    holders = random_holders(rng, 24, ep, 4)
    tab = cm.copy_table(holders, rule_nodes(ep, local))
    assert cm._node_block(tab) == local
    counts_i = rng.integers(0, 40, size=(ep, 24))
    counts_i[:, 3] = 0
    counts_f = rng.random((ep, 24)) * 100
    fast = [cm.split_over_copies(c, tab) for c in (counts_i, counts_f)]
    monkeypatch.setattr(cm, "_node_block", lambda table: 0)  # the per-node passes (the runtime's torch path)
    slow = [cm.split_over_copies(c, tab) for c in (counts_i, counts_f)]
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
