"""Placers on hand-made cases with known answers, memory, migration and the re-plan decision."""
import numpy as np
import pytest

from moepipe.config import ConfigError, DeviceGroupConfig, ModelConfig, MoEConfig, TopologyConfig, TrainConfig
from moepipe.placement.cost_model import CostModel
from moepipe.placement.model_spec import build_model_spec
from moepipe.placement.plan import Plan, to_json, validate_plan
from moepipe.placement.placers import (
    Evaluator, PlacementInputs, decide, make_placement, migration_bytes, migration_time_s, predict_iteration_time,
)
from moepipe.placement.placers.inputs import routing_of
from moepipe.placement.placers.packing import (
    bins_of, eplb_batch, eplb_layer, pack, pack_batch, pieces_array, pieces_batch, pieces_of, refine, refine_batch, replicate_counts,
    replicate_counts_batch,
)
from moepipe.placement.placers.partition import minmax_partition
from moepipe.placement.topology import from_config
from moepipe.placement.workloads import routing_counts
from moepipe.sim import simulate

PLACERS = ("static", "balance_by_time", "eplb", "topo")


def topology(nodes=1, per_node=8, speeds=None, memory_gb=80.0, name="test"):
    n = nodes * per_node
    speeds = [1.0] * n if speeds is None else speeds
    groups = [DeviceGroupConfig(count=1, name="gpu", tflops=100.0, memory_gb=memory_gb, speed=s) for s in speeds]
    return from_config(TopologyConfig(name=name, nodes=nodes, devices_per_node=per_node, device_groups=groups,
                                      intra_node_bw_gbps=300.0, intra_node_latency_us=5.0, inter_node_bw_gbps=25.0,
                                      inter_node_latency_us=10.0))


def inputs(pp=1, ep=2, dp=1, topo=None, n_layers=4, experts=8, top_k=2, schedule="1f1b", v=1, m=4, load=None,
           layer_times=None, vocab=64, d=256, batch=None, seq=256, ckpt=False):
    model = ModelConfig(name="t", vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=4, ffn_hidden=4 * d, max_seq_len=seq)
    moe = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=2 * d)
    train = TrainConfig(batch_size=batch or ep * dp * m * 2, seq_len=seq, activation_checkpointing=ckpt)
    spec = build_model_spec(model, moe, train, microbatches=m, dp=dp)
    topo = topo or topology(1, pp * ep * dp)
    style = "v" if schedule in ("zbv", "dualpipev") else "loop"
    return PlacementInputs(topo, spec, CostModel(spec), pp, ep, dp, v, style, schedule, m, expert_load=load, layer_times=layer_times)


def skew(inp, kind="zipf", strength=1.2, seed=0):
    return routing_counts(kind, 0, inp.spec.moe_layers, inp.spec.num_experts, 1000, inp.spec.top_k, strength=strength, ep=inp.ep, seed=seed)


# ------------------------------------------------------------------ partition


def test_minmax_partition_known_optimum_and_not_worse_than_fairscale():
    assert minmax_partition(np.array([[1, 1, 1, 5]] * 2)) == [(0, 3), (3, 4)]
    # a 2x faster second stage takes more blocks: stage time = cost / speed
    assert minmax_partition(np.array([[1.0] * 6, [0.5] * 6])) == [(0, 2), (2, 6)]
    from fairscale.nn.pipe.balance import blockpartition

    rng = np.random.default_rng(0)
    for _ in range(20):
        seq = [int(x) for x in rng.integers(1, 20, size=12)]
        k = int(rng.integers(2, 5))
        ours = minmax_partition(np.array([seq] * k, dtype=float))
        fs = blockpartition.solve(seq, k)
        assert max(sum(seq[a:b]) for a, b in ours) <= max(sum(p) for p in fs)


def test_minmax_partition_memory_caps():
    # without the cap stage 0 would take three blocks; it may hold only two
    out = minmax_partition(np.array([[1, 1, 1, 5]] * 2, dtype=float), mem=np.ones((2, 4)), cap=np.array([2.0, 9.0]))
    assert out == [(0, 2), (2, 4)]
    assert minmax_partition(np.ones((2, 4)), mem=np.ones((2, 4)), cap=np.array([1.0, 1.0])) is None


def test_balance_by_time_uses_layer_times():
    inp = inputs(pp=2, ep=1, n_layers=4, experts=4, vocab=8, layer_times=np.array([1.0, 1.0, 1.0, 5.0]))
    plan = make_placement("balance_by_time", inp)
    assert plan.stage_layers == [(0, 3), (3, 4)] and plan.meta["placer"] == "balance_by_time"


def test_balance_by_time_gives_a_faster_rank_more_blocks():
    inp = inputs(pp=2, ep=1, n_layers=6, experts=4, vocab=8, topo=topology(1, 2, speeds=[1.0, 2.0]))
    plan = make_placement("balance_by_time", inp)
    assert plan.stage_layers == [(0, 2), (2, 6)]


# ------------------------------------------------------------------ eplb


def test_eplb_replicates_heaviest_and_packs_to_known_max():
    w = np.array([10.0, 2, 2, 2, 2, 2, 2, 2])
    # 2 ranks x 5 slots = 10 copies: expert 0 twice (max copies = ep), then expert 1
    assert replicate_counts(w, 2, max_copies=2).tolist() == [2, 2, 1, 1, 1, 1, 1, 1]
    emap = eplb_layer(w, ep=2, slots=5)
    assert emap[0] == [0, 1] and emap[1] == [0, 1]
    load = np.zeros(2)
    for e, ranks in enumerate(emap):
        load[ranks] += w[e] / len(ranks)
    assert load.max() == 12.0 and all(sum(r in rs for rs in emap) == 5 for r in range(2))
    # no spare slot: the hot expert alone bounds the max load
    emap = eplb_layer(w, ep=2, slots=4)
    load = np.zeros(2)
    for e, ranks in enumerate(emap):
        load[ranks] += w[e]
    assert load.max() == 16.0  # 4 slots each: the hot expert shares its rank with three 2s (optimal)


def test_eplb_hierarchical_keeps_replicas_in_node():
    w = np.array([40.0] + [1.0] * 15)
    nodes = [0, 0, 1, 1]
    emap = eplb_layer(w, ep=4, slots=5, member_node=nodes)
    for ranks in emap:
        assert len({nodes[r] for r in ranks}) == 1
    assert len(emap[0]) == 2  # the hot expert got both ranks of its node


def test_pack_is_speed_weighted():
    ids, loads = pieces_of(range(6), np.ones(6), np.ones(6, dtype=np.int64))
    bins = pack(ids, loads, 2, 6, rate=np.array([1.0, 2.0]))
    assert [len(b) for b in bins] == [2, 4]


def _pack_reference(ids, loads, n, cap, rate, base):
    """The packing rule spelled out one piece at a time (plain Python)."""
    bins, load = [[] for _ in range(n)], list(base)
    for e, x in zip(ids.tolist(), loads.tolist()):
        ok = [b for b in range(n) if len(bins[b]) < cap[b] and e not in bins[b]]
        if not ok:
            continue
        fin = {b: (load[b] + x) / rate[b] for b in ok}
        best = min(fin.values())
        b = min((b for b in ok if fin[b] <= best * (1 + 1e-12)), key=lambda b: (len(bins[b]), b))
        bins[b].append(e)
        load[b] += x
    for b in range(n):
        if not bins[b]:
            donor = max(range(n), key=lambda k: (len(bins[k]), -k))
            if len(bins[donor]) > 1:
                bins[b].append(bins[donor].pop())
    return bins


def _random_pack_problems(rng, count=40, n_max=6):
    """Mixed rates, per-bin capacities (some 0), replicated experts and too few pieces to fill every bin."""
    out = []
    for t in range(count):
        n = int(rng.integers(1, n_max + 1))
        E = int(rng.integers(1, 14))
        w = rng.lognormal(0, 1.5, E) if t % 4 else rng.integers(1, 4, E).astype(float)  # integer loads: exact ties
        counts = rng.integers(1, min(n, 3) + 1, E)
        ids, loads = pieces_of(range(E), w, counts)
        cap = rng.integers(0 if t % 3 == 0 else 1, 5, n)
        rate = rng.choice([1.0, 1.5, 2.0], n) if t % 2 else np.ones(n)
        base = rng.random(n) * w.sum() / n if t % 5 else np.zeros(n)
        out.append((ids, loads, n, cap, rate, base))
    return out


def test_pack_follows_the_greedy_rule():
    for ids, loads, n, cap, rate, base in _random_pack_problems(np.random.default_rng(5)):
        assert pack(ids, loads, n, cap, rate, base) == _pack_reference(ids, loads, n, cap, rate, base)


def test_pack_batch_equals_packing_each_problem_alone():
    probs = _random_pack_problems(np.random.default_rng(7), count=60)
    C, P, n = len(probs), max(len(p[0]) for p in probs), max(p[2] for p in probs)
    ids, loads, valid = np.zeros((C, P), dtype=np.int64), np.zeros((C, P)), np.zeros((C, P), dtype=bool)
    cap, rate, base = np.zeros((C, n), dtype=np.int64), np.ones((C, n)), np.zeros((C, n))
    for c, (i, x, k, cp, r, b) in enumerate(probs):
        ids[c, :len(i)], loads[c, :len(i)], valid[c, :len(i)] = i, x, True
        cap[c, :k], rate[c, :k], base[c, :k] = cp, r, b
        cap[c, k:] = 9  # bins past n_bins must stay unused whatever their capacity
    n_bins = np.array([p[2] for p in probs])
    out = pack_batch(ids, loads, valid, cap, rate, base, n_bins)
    assert (out[~valid] == -1).all() and (out < n_bins[:, None]).all()
    for c, (i, x, k, cp, r, b) in enumerate(probs):
        alone = pack(i, x, k, cp, r, b)
        assert [ids[c][out[c] == bin_].tolist() for bin_ in range(k)] == alone
    assert any(not all(pack(*p)) for p in probs) and any(len(p[0]) > sum(map(len, pack(*p))) for p in probs)  # empty bins, dropped pieces


def _replicate_reference(w, n_extra, max_copies):
    c = [1] * len(w)
    for _ in range(n_extra):
        ok = [e for e in range(len(w)) if c[e] < max_copies]
        if not ok:
            break
        e = max(ok, key=lambda e: (w[e] / c[e], -e))
        c[e] += 1
    return c


def test_replicate_counts_batch_equals_the_loop():
    rng = np.random.default_rng(11)
    C, E = 30, 9
    w = np.where(rng.random((C, E)) < 0.3, rng.integers(1, 5, (C, E)), rng.lognormal(0, 1, (C, E)))  # some exact ties
    valid = rng.random((C, E)) < 0.8
    n_extra, max_copies = rng.integers(-1, 20, C), rng.integers(1, 5, C)
    out = replicate_counts_batch(w, n_extra, max_copies, valid)
    for c in range(C):
        cols = np.flatnonzero(valid[c])
        assert (out[c][~valid[c]] == 0).all()
        assert out[c][cols].tolist() == _replicate_reference(w[c, cols].tolist(), max(0, int(n_extra[c])), int(max_copies[c]))
        assert out[c][cols].tolist() == replicate_counts(w[c, cols], int(n_extra[c]), int(max_copies[c])).tolist()


def test_pieces_batch_equals_pieces_of():
    rng = np.random.default_rng(2)
    w, counts = rng.integers(1, 4, (5, 7)).astype(float), rng.integers(0, 3, (5, 7))
    col, load, valid = pieces_batch(w, counts)
    for c in range(5):
        ids, loads = pieces_of(range(7), w[c], counts[c])
        assert col[c][valid[c]].tolist() == ids.tolist() and load[c][valid[c]].tolist() == loads.tolist()


@pytest.mark.parametrize("nodes", [None, [0, 0, 1, 1], [0, 0, 0, 1, 1, 2]])
def test_eplb_batch_equals_one_layer_at_a_time(nodes):
    rng = np.random.default_rng(4)
    ep = 4 if nodes is None else len(nodes)
    w = rng.lognormal(0, 1.5, (6, 16))
    w[0] = 1.0  # all tied
    for slots in (4, 6):
        assert eplb_batch(w, ep, slots, nodes) == [eplb_layer(x, ep, slots, nodes) for x in w]


def _max_finish(bins, w, rate, base):
    held = np.zeros((len(bins), len(w)), dtype=bool)
    for b, xs in enumerate(bins):
        held[b, xs] = True
    return ((base + held @ (w / held.sum(0).clip(min=1))) / rate).max()


def test_refine_lowers_the_slowest_bin_and_keeps_every_copy():
    w = np.array([9.0, 1, 1, 1, 1, 1])
    bins = [[0, 1, 2], [3, 4, 5]]  # 11 vs 3: moving a light piece of bin 0 over helps
    out = refine(bins, w, 4, np.ones(2), np.zeros(2))
    assert _max_finish(out, w, np.ones(2), np.zeros(2)) < 11
    assert sorted(e for b in out for e in b) == list(range(6)) and all(len(b) <= 4 for b in out)


def test_refine_batch_equals_refining_each_problem_alone():
    rng = np.random.default_rng(3)
    n, K, probs, ws, rates, bases = 5, 4, [], [], [], []
    for t in range(12):
        E = int(rng.integers(n, n * K - 2))
        w = rng.lognormal(0, 1.5, E) if t % 3 else np.ones(E)
        w = np.concatenate([w, np.zeros(n * K - E)])  # pad to one expert count; zero-load experts hold no piece
        rate = rng.choice([1.0, 2.0], n) if t % 2 else np.ones(n)
        base = np.full(n, float(rng.random() * w.sum() / n))
        ids, loads = pieces_of(range(E), w, replicate_counts(w[:E], n * K - E - int(rng.integers(0, 3)), n))
        probs.append(pack(ids, loads, n, K, rate, base))
        ws.append(w), rates.append(rate), bases.append(base)
    pb, pe, valid = pieces_array(probs)
    out = refine_batch(pb, pe, valid, np.array(ws), K, np.array(rates), np.array(bases), 6)
    for i, bins in enumerate(probs):
        alone = refine(bins, ws[i], K, rates[i], bases[i], 6)
        assert bins_of(out[i], pe[i], valid[i], n) == alone
        assert _max_finish(alone, ws[i], rates[i], bases[i]) <= _max_finish(bins, ws[i], rates[i], bases[i]) * (1 + 1e-12)


def _refine_reference(pb, pe, valid, w, K, rate, base, rounds):
    """refine_batch's rule for one problem, one candidate at a time (plain Python): per round the
    slowest bin h (lowest index on ties) tries every move of one of its pieces x (by expert) to a
    bin b (ascending), then every swap with a lighter piece y of another bin (by (bin, expert));
    the best finish wins if it beats h's (ties: first found; moves before swaps)."""
    pb, n = [int(b) for b in pb], len(rate)
    pieces = [j for j in range(len(pb)) if valid[j]]
    copies = np.bincount([pe[j] for j in pieces], minlength=len(w))
    ppw = {j: w[pe[j]] / max(copies[pe[j]], 1) for j in pieces}
    bound = (base.sum() + w.sum()) / rate.sum()
    for _ in range(rounds):
        size = [sum(pb[j] == b for j in pieces) for b in range(n)]
        load = [base[b] + sum((ppw[j] for j in pieces if pb[j] == b), 0.0) for b in range(n)]
        fin = [load[b] / rate[b] for b in range(n)]
        order = sorted(range(n), key=lambda b: (-fin[b], b))
        h, fh = order[0], fin[order[0]]
        if not fh > bound * (1 + 1e-4):
            break
        third = fin[order[2]] if n > 2 else 0.0
        rest = [third if b == order[1] else fin[order[1]] for b in range(n)]
        holds = lambda b, e: any(pb[j] == b and pe[j] == e for j in pieces)  # noqa: E731
        mine = sorted((j for j in pieces if pb[j] == h), key=lambda j: pe[j])
        best, choice = fh * (1 - 1e-9), None
        for j in mine:
            for b in range(n):
                if size[b] < K and not holds(b, pe[j]) and b != h and size[h] > 1:
                    v = max(max((load[h] - ppw[j]) / rate[h], (load[b] + ppw[j]) / rate[b]), rest[b])
                    if v < best:
                        best, choice = v, ("move", j, b)
        others = sorted((j for j in pieces if pb[j] != h), key=lambda j: (pb[j], pe[j]))
        for j in mine:
            for y in others:
                b = pb[y]
                if ppw[y] < ppw[j] and not holds(h, pe[y]) and not holds(b, pe[j]):
                    v = max(max((load[h] - ppw[j] + ppw[y]) / rate[h], (load[b] - ppw[y] + ppw[j]) / rate[b]), rest[b])
                    if v < best:
                        best, choice = v, ("swap", j, y)
        if choice is None:
            break
        if choice[0] == "move":
            pb[choice[1]] = choice[2]
        else:
            pb[choice[1]], pb[choice[2]] = pb[choice[2]], h
    return pb


def test_refine_batch_follows_the_rule():
    # the batched search (one numpy pass per piece of the slowest bin) against the rule spelled out
    rng = np.random.default_rng(9)
    n, K, probs, ws, rates, bases = 6, 4, [], [], [], []
    for t in range(16):
        E = int(rng.integers(n, n * K - 1))
        w = rng.lognormal(0, 1.2, E) if t % 3 else rng.integers(1, 4, E).astype(float)  # integer loads: exact ties
        w = np.concatenate([w, np.zeros(n * K - E)])
        rate = rng.choice([1.0, 2.0], n) if t % 2 else np.ones(n)
        base = rng.random(n) * w.sum() / n if t % 4 else np.zeros(n)
        ids, loads = pieces_of(range(E), w, replicate_counts(w[:E], n * K - E - int(rng.integers(0, 4)), n))
        probs.append(pack(ids, loads, n, K, rate, base))
        ws.append(w), rates.append(rate), bases.append(base)
    pb, pe, valid = pieces_array(probs)
    out = refine_batch(pb, pe, valid, np.array(ws), K, np.array(rates), np.array(bases), 8)
    moved = 0
    for i in range(len(probs)):
        ref = _refine_reference(pb[i], pe[i], valid[i], ws[i], K, rates[i], bases[i], 8)
        assert [b for b, v in zip(out[i].tolist(), valid[i]) if v] == [b for b, v in zip(ref, valid[i]) if v]
        moved += int((out[i] != pb[i])[valid[i]].any())
    assert moved >= 4  # the search did something on several problems


def _plan_copies_reference(n, dem, fair, left, node_slots, size):
    """_plan_copies recomputing every expert's heaviest copy each round (its earlier form)."""
    C, E, G = dem.shape
    rows = np.arange(C)
    n[rows[:, None], np.arange(E)[None, :], dem.argmax(2)] = 1
    for _ in range(int(left.max()) if C else 0):
        heavy = np.where(n > 0, dem / np.maximum(n, 1), -np.inf).max(2) + (dem * (n == 0)).sum(2) / n.sum(2)
        e = heavy.argmax(1)
        de, ne = dem[rows, e], n[rows, e]
        room = (ne < size[None, :]) & (n.sum(1) < node_slots[None, :])
        bare = room & (ne == 0) & (de > 0)
        g = np.where(bare.any(1), np.where(bare, de, -np.inf).argmax(1), np.where(room & (ne > 0), de / np.maximum(ne, 1), -np.inf).argmax(1))
        live = (left > 0) & (heavy[rows, e] > fair * (1 + 1e-9)) & room[rows, g]
        if not live.any():
            return
        n[rows[live], e[live], g[live]] += 1
        left[live] -= 1


def test_plan_copies_keeps_the_heaviest_copy_current():
    # only the expert that got a copy is re-scored each round: the same copies as re-scoring all
    from moepipe.placement.placers.packing import _plan_copies

    rng = np.random.default_rng(8)
    spent = 0
    for t in range(24):
        C, E, G = int(rng.integers(1, 8)), int(rng.integers(4, 40)), int(rng.choice([2, 4]))
        size = np.full(G, int(rng.choice([2, 4])))
        dem = rng.lognormal(0, 1.5, (C, E, G)) * (rng.random((C, E, G)) < 0.7)
        dem = np.round(dem) if t % 3 == 0 else dem  # exact ties
        left = rng.integers(0, 2 * G * size[0], C)
        args = (dem.sum((1, 2)) / (G * size[0]), (E // (G * size[0]) + 2) * size, size)
        n1, n2, l1, l2 = np.zeros((C, E, G), dtype=np.int64), np.zeros((C, E, G), dtype=np.int64), left.copy(), left.copy()
        _plan_copies(n1, dem, args[0], l1, *args[1:])
        _plan_copies_reference(n2, dem, args[0], l2, *args[1:])
        assert np.array_equal(n1, n2) and np.array_equal(l1, l2)
        spent += int((left - l1).sum())
    assert spent > 50


def test_one_blas_thread_pins_and_restores():
    from moepipe.placement.placers.blas import one_blas_thread, openblas_threads_api

    api = openblas_threads_api()
    if api is None:
        pytest.skip("numpy's BLAS is not OpenBLAS here: the pin is a no-op")
    before = api[0]()
    api[1](2)
    try:
        if api[0]() != 2:
            pytest.skip("OpenBLAS runs one thread at most here")
        with one_blas_thread():
            assert api[0]() == 1
            with one_blas_thread():  # nested (decide -> make_placement): the outer one restores
                assert api[0]() == 1
            assert api[0]() == 1
        assert api[0]() == 2
    finally:
        api[1](before)


# ------------------------------------------------------------------ topo


def test_topo_gives_a_2x_faster_device_more_tokens():
    inp = inputs(pp=1, ep=2, topo=topology(1, 2, speeds=[1.0, 2.0]), experts=8)
    plan = make_placement("topo", inp, replica_slots=2)
    routed = Evaluator(inp).routed(plan)
    assert (routed[:, 1] > 1.5 * routed[:, 0]).all()
    assert predict_iteration_time(plan, inp) < predict_iteration_time(make_placement("static", inp), inp)


def test_topo_gives_a_2x_faster_pipeline_rank_more_layers():
    inp = inputs(pp=2, ep=1, n_layers=8, topo=topology(1, 2, speeds=[1.0, 2.0]), m=8)
    plan = make_placement("topo", inp)
    (a, b), (c, d) = plan.stage_layers
    assert d - c > b - a


def test_topo_keeps_a_hot_experts_replica_in_node():
    inp = inputs(pp=1, ep=8, topo=topology(2, 4), experts=16, top_k=2)
    inp.expert_load = skew(inp, "hot_expert", strength=4.0)  # a hot expert one node can absorb
    plan = make_placement("topo", inp, replica_slots=1)
    node = inp.topology.node_of
    for l, emap in plan.expert_map.items():
        hot = int(np.argmax(inp.expert_load[l]))
        assert len(emap[hot]) > 1 and len({int(node[r]) for r in emap[hot]}) == 1


@pytest.mark.parametrize("kind", ["none", "zipf", "hot_expert", "hot_rank", "lognormal"])
def test_topo_never_worse_than_static_and_eplb(kind):
    inp = inputs(pp=2, ep=4, dp=1, topo=topology(2, 4), n_layers=6, experts=8, m=8)
    inp.expert_load = skew(inp, kind, strength=4.0 if kind != "zipf" else 1.2)
    t = {n: predict_iteration_time(make_placement(n, inp, replica_slots=1), inp) for n in PLACERS}
    assert t["topo"] <= min(t["static"], t["eplb"]) * (1 + 1e-12)


@pytest.mark.parametrize("name", PLACERS)
def test_plans_are_valid_fixed_stage_ranks_deterministic_and_fit(name):
    inp = inputs(pp=2, ep=2, dp=2, n_layers=8, schedule="interleaved_1f1b", v=2, m=4, topo=topology(1, 8, speeds=[1, 1, 2, 2, 1, 1, 2, 2]))
    inp.expert_load = skew(inp)
    a = make_placement(name, inp, replica_slots=1)
    b = make_placement(name, inp, replica_slots=1)
    validate_plan(a, 8, inp.spec.moe_layers, 8)
    assert a.stage_to_pp_rank == [0, 1, 0, 1] and a.meta["placer"] == name
    assert to_json(Plan(a.stage_layers, a.stage_to_pp_rank, a.expert_map, 2, 2, 2)) == to_json(Plan(b.stage_layers, b.stage_to_pp_rank, b.expert_map, 2, 2, 2))
    ev = Evaluator(inp).evaluate(a)
    assert (ev.memory_bytes <= np.array([d.memory_bytes for d in inp.topology.devices])).all()


def test_v_schedule_keeps_v_assignment():
    inp = inputs(pp=2, ep=2, n_layers=8, schedule="zbv", v=2, m=4)
    inp.expert_load = skew(inp)
    plan = make_placement("topo", inp, replica_slots=1)
    assert plan.stage_to_pp_rank == [0, 1, 1, 0]


def test_infeasible_memory_is_a_one_line_error_naming_the_field():
    inp = inputs(pp=1, ep=2, topo=topology(1, 2, memory_gb=0.001))
    for name in PLACERS:
        with pytest.raises(ConfigError, match=rf"^placer.name={name} .*needs .* GB on rank \d") as exc:
            make_placement(name, inp)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="placer.name='nope' is not known"):
        make_placement("nope", inp)


# ------------------------------------------------------------------ evaluation = simulator


@pytest.mark.parametrize("schedule,v,ckpt", [("1f1b", 1, False), ("interleaved_1f1b", 2, True), ("zbv", 2, False)])
def test_evaluator_matches_the_simulator(schedule, v, ckpt):
    inp = inputs(pp=2, ep=4, dp=2, n_layers=8, schedule=schedule, v=v, m=4, topo=topology(2, 8, speeds=[1] * 8 + [2] * 8), ckpt=ckpt)
    inp.expert_load = skew(inp)
    plan = make_placement("eplb", inp, replica_slots=1)
    sim = simulate(plan, schedule, 4, inp.topology, inp.cost_model, routing_of(inp))
    ev = Evaluator(inp).evaluate(plan)
    assert np.isclose(ev.iteration_time_s, sim.iteration_time_s, rtol=1e-12)
    assert np.allclose(ev.act_bytes, sim.peak_activation_bytes, rtol=1e-12)


def test_evaluator_shares_all_to_all_times_only_between_identical_groups():
    # two nodes of 3, EP groups of 2: ranks (0, 1) and (4, 5) are inside a node, (2, 3) spans both
    inp = inputs(pp=1, ep=2, dp=3, topo=topology(2, 3), n_layers=4)
    inp.expert_load = skew(inp)
    ev = Evaluator(inp)
    assert len(ev.class_group) == 2 and ev.group_class[0].tolist() == [0, 1, 0]
    routed = ev.routed(make_placement("eplb", inp, replica_slots=1))
    _, a2a = ev.layer_times(routed)
    for d in range(3):  # the shared value is exactly the direct computation for every group
        want = 2 * inp.topology.dispatch_time(routed * ev.bpt, ev.grid[0, d])
        assert np.array_equal(a2a[inp.spec.moe_layers, 0, d], want)


def test_evaluate_is_memoised_per_layout_and_equals_a_fresh_evaluation():
    inp = inputs(pp=2, ep=4, n_layers=6, experts=8, m=8, topo=topology(1, 8))
    inp.expert_load = skew(inp)
    plan = make_placement("topo", inp, replica_slots=1)
    ev = Evaluator(inp)
    a = ev.evaluate(plan)
    assert ev.evaluate(plan) is a
    moved = Plan([(0, 2), (2, 6)], plan.stage_to_pp_rank, plan.expert_map, plan.pp, plan.ep, plan.dp)
    assert ev.evaluate(moved).iteration_time_s == Evaluator(inp).evaluate(moved).iteration_time_s


# ------------------------------------------------------------------ migration and decision


def test_migration_bytes_zero_for_same_plan_and_3x_fp32_per_moved_expert():
    inp = inputs(pp=2, ep=2, dp=2, n_layers=4, topo=topology(1, 8))
    old = make_placement("static", inp)
    assert migration_bytes(old, old, inp).sum() == 0 and migration_time_s(old, old, inp) == 0.0
    emap = {l: [list(r) for r in v] for l, v in old.expert_map.items()}
    l = inp.spec.moe_layers[0]
    emap[l][0] = [0, 1]  # a replica of expert 0 on EP rank 1 (pipeline rank of layer l), both dp replicas
    new = Plan(old.stage_layers, old.stage_to_pp_rank, emap, 2, 2, 2)
    b = migration_bytes(old, new, inp)
    per = 12 * inp.spec.layers[l].expert_params
    assert b.sum() == 2 * per and np.count_nonzero(b) == 2
    assert migration_time_s(old, new, inp) > 0
    # moving a block to the other pipeline rank: its dense parameters to each of that rank's ep x dp members
    moved = Plan([(0, 1), (1, 4)], old.stage_to_pp_rank, old.expert_map, 2, 2, 2)
    b = migration_bytes(old, moved, inp)
    lay = inp.spec.layers[1]
    assert b.sum() == 4 * 12 * lay.params + 4 * 12 * lay.expert_params * 4  # E=8 over ep=2: 4 experts per EP rank


def test_decide_migrates_on_persistent_skew_not_on_noise_or_a_burst():
    inp = inputs(pp=2, ep=4, n_layers=6, experts=8, m=8, topo=topology(1, 8))
    current = make_placement("static", inp)
    rng = np.random.default_rng(0)
    uni = routing_counts("none", 0, inp.spec.moe_layers, 8, 1000, 2)
    inp.expert_load = {l: c * (1 + 0.01 * rng.standard_normal(8)) for l, c in uni.items()}
    d = decide("topo", inp, current, replica_slots=1, horizon_steps=50)
    assert not d.migrate and d.plan is current
    # one burst step folded into an EMA (decay 0.9) of uniform load: below the threshold
    burst = routing_counts("burst", 0, inp.spec.moe_layers, 8, 1000, 2, strength=1.3, burst_every=10)
    inp.expert_load = {l: 0.9 * uni[l] + 0.1 * burst[l] for l in uni}
    d = decide("topo", inp, current, replica_slots=1, horizon_steps=50)
    assert not d.migrate and "min_gain_frac" in d.reason or "keeps" in d.reason
    inp.expert_load = skew(inp, "zipf", 1.2)
    d = decide("topo", inp, current, replica_slots=1, horizon_steps=50)
    assert d.migrate and d.plan is not current and d.predicted_gain_s > d.migration_cost_s and d.bytes_moved > 0
    # a one-step horizon cannot pay for the move
    d = decide("topo", inp, current, replica_slots=1, horizon_steps=0)
    assert not d.migrate


def test_realised_efficiency_is_the_share_of_the_predicted_saving_seen():
    from moepipe.placement.placers import EFFICIENCY_FLOOR, realised_efficiency

    # predicted 1.0 -> 0.5 s (50% saving); measured 2.0 -> 1.5 s (25%): half of it showed
    assert realised_efficiency(1.0, 0.5, 2.0, 1.5) == pytest.approx(0.5)
    assert realised_efficiency(1.0, 0.5, 2.0, 0.8) == 1.0  # never more trust than the model
    assert realised_efficiency(1.0, 0.5, 2.0, 2.4) == EFFICIENCY_FLOOR  # the move made it slower
    assert realised_efficiency(1.0, 1.0, 2.0, 1.5) is None  # nothing was predicted
    assert realised_efficiency(1.0, 0.5, None, 1.5) is None


# ------------------------------------------------------------------ token origins: bytes by link class (issue 14)


def _origins(inp, per_expert_sources):
    """{layer: [ep, E]} with expert e's tokens split over source ranks as per_expert_sources[e] = {rank: share}."""
    E, ep = inp.spec.num_experts, inp.ep
    o = np.zeros((ep, E))
    for e, src in enumerate(per_expert_sources):
        for r, share in src.items():
            o[r, e] = share
    return {l: o.copy() for l in inp.spec.moe_layers}


def test_placer_bytes_by_link_class_match_a_hand_computed_case():
    # 2 nodes x 2 ranks (ranks 0,1 | 2,3), one expert per rank (static: expert e on rank e), equal loads
    inp = inputs(pp=1, ep=4, topo=topology(2, 2), n_layers=2, experts=4, top_k=1, m=2)
    inp.origins = _origins(inp, [{0: 1.0}, {0: 0.5, 2: 0.5}, {3: 1.0}, {2: 1.0}])
    spec = inp.spec
    A = spec.tokens_per_microbatch * spec.top_k / 4  # assignments per expert per microbatch
    per_iter = spec.hidden_bytes_per_token * inp.microbatches * len(spec.moe_layers) * 2 * 2  # dispatch+combine, fwd+bwd
    # e0 stays on rank 0; e1: rank 0 -> 1 (intra), rank 2 -> 1 (inter); e2: 3 -> 2 (intra); e3: 2 -> 3 (intra)
    want = {"a2a_bytes_intra_node": (A / 2 + A + A) * per_iter, "a2a_bytes_inter_node": (A / 2) * per_iter}
    static = make_placement("static", inp)
    assert static.expert_map[spec.moe_layers[0]] == [[0], [1], [2], [3]]
    for k, v in want.items():
        assert Evaluator(inp).traffic(static)[k] == pytest.approx(v, rel=1e-12)
        assert static.meta[k] == pytest.approx(v, rel=1e-12)
    res = simulate(static, inp.schedule, inp.microbatches, inp.topology, inp.cost_model, routing_of(inp), origins=inp.origins)
    assert res.a2a_bytes_intra_node == pytest.approx(want["a2a_bytes_intra_node"], rel=1e-12)
    assert res.a2a_bytes_inter_node == pytest.approx(want["a2a_bytes_inter_node"], rel=1e-12)
    # a copy of e1 on rank 2: rank 2's half stays on its own rank (nearest replica), rank 0's half still goes to rank 1
    rep = Plan(static.stage_layers, static.stage_to_pp_rank, {l: [[0], [1, 2], [2], [3]] for l in spec.moe_layers}, 1, 4, 1)
    tr = Evaluator(inp).traffic(rep)
    assert tr["a2a_bytes_inter_node"] == pytest.approx(0.0, abs=1e-6)
    assert tr["a2a_bytes_intra_node"] == pytest.approx((A / 2 + A + A) * per_iter, rel=1e-12)


def _local_hot(inp, strength=8.0, seed=0):
    from moepipe.placement.workloads import routing_origins

    return routing_origins("local_hot", 0, inp.spec.moe_layers, inp.spec.num_experts, 1000, inp.spec.top_k, ep=inp.ep, strength=strength, seed=seed)


def test_topo_puts_origin_local_experts_on_their_node_and_moves_fewer_inter_node_bytes():
    inp = inputs(pp=1, ep=4, topo=topology(2, 2), n_layers=3, experts=8, top_k=2, m=4)
    inp.origins = _local_hot(inp)
    # every layer the same (uniform) job-wide load, bit for bit: only the origins tell the layers apart
    inp.expert_load = {l: np.ones(inp.spec.num_experts) for l in inp.origins}
    node = inp.topology.node_of
    topo_plan = make_placement("topo", inp, replica_slots=0)
    for l, emap in topo_plan.expert_map.items():
        for e, ranks in enumerate(emap):
            src = int(np.argmax(inp.origins[l][:, e]))  # the rank whose data prefers e
            assert {int(node[r]) for r in ranks} == {int(node[src])}, (l, e, ranks, src)
    eplb_plan = make_placement("eplb", inp, replica_slots=0)
    assert topo_plan.meta["a2a_bytes_inter_node"] < 0.7 * eplb_plan.meta["a2a_bytes_inter_node"]
    assert topo_plan.meta["predicted_s"] <= eplb_plan.meta["predicted_s"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topo_never_slower_than_eplb_with_skewed_origins(seed):
    rng = np.random.default_rng(seed)
    inp = inputs(pp=2, ep=4, topo=topology(4, 2), n_layers=4, experts=8, top_k=2, m=4)
    # job-wide skew times a random per-source skew (Dirichlet rows)
    job = rng.dirichlet(np.full(inp.spec.num_experts, 0.7), size=len(inp.spec.moe_layers))
    inp.origins = {l: rng.dirichlet(np.full(inp.spec.num_experts, 0.5), size=inp.ep) * job[i] for i, l in enumerate(inp.spec.moe_layers)}
    inp.expert_load = {l: o.sum(0) for l, o in inp.origins.items()}
    t = {n: predict_iteration_time(make_placement(n, inp, replica_slots=1), inp) for n in ("static", "eplb", "topo")}
    assert t["topo"] <= min(t["static"], t["eplb"]) * (1 + 1e-12)


def test_ep_layout_comparison_reports_both_orders_and_keeps_the_runtime_plan():
    from moepipe.placement.placers.layout import device_order

    # pp=2 x ep=2 on 2 nodes x 2: EP inside nodes (runtime order) or across them
    assert device_order("ep_inner", 2, 2, 1).tolist() == [0, 1, 2, 3]
    assert device_order("ep_outer", 2, 2, 1).tolist() == [0, 2, 1, 3]  # (pp0: ep0, ep1) on devices 0 and 2
    inp = inputs(pp=2, ep=2, topo=topology(2, 2), n_layers=4, experts=4, m=4)
    plan = make_placement("topo", inp, replica_slots=0, compare_layouts=True)
    rep = plan.meta["ep_layout"]
    inner, outer = rep["layouts"]["ep_inner"], rep["layouts"]["ep_outer"]
    assert inner["ep_group_nodes"] == 1 and outer["ep_group_nodes"] == 2
    assert inner["a2a_bytes_inter_node"] == 0 and outer["a2a_bytes_inter_node"] > 0
    assert inner["predicted_s"] == pytest.approx(plan.meta["predicted_s"], rel=1e-12)  # the returned plan is the runtime order's
    assert rep["best"] == min(rep["layouts"], key=lambda k: rep["layouts"][k]["predicted_s"])
    assert rep["speedup_best_vs_runtime"] >= 1.0 and rep["runtime"] == "ep_inner"
