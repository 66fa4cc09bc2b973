"""Plan construction, validation, JSON round trip and the (pp, ep, dp) <-> global rank mapping."""
import json

import numpy as np
import pytest

from moepipe.config import ConfigError
from moepipe.placement.plan import (
    Plan, _holders_valid, experts_on_rank, from_json, global_rank, mesh_coords, rank_grid, stage_assignment, static_plan, to_json, validate_plan,
)


def test_static_plan_even_split_remainder_first():
    p = static_plan(10, [1, 3, 5, 7, 9], 8, pp=4, ep=2)
    assert p.stage_layers == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert p.stage_to_pp_rank == [0, 1, 2, 3]
    assert p.expert_map[1] == [[0]] * 4 + [[1]] * 4
    assert experts_on_rank(p, 5, 1) == [4, 5, 6, 7]
    validate_plan(p, 10, [1, 3, 5, 7, 9], 8)


def test_static_plan_uneven_experts_and_virtual_stages():
    p = static_plan(8, [0], 7, pp=2, ep=3, virtual_stages=2)
    assert p.stage_layers == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert p.stage_to_pp_rank == [0, 1, 0, 1]
    assert [experts_on_rank(p, 0, r) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    v = static_plan(8, [0], 4, pp=4, ep=1, virtual_stages=2, style="v")
    assert v.stage_to_pp_rank == [0, 1, 2, 3, 3, 2, 1, 0]
    assert stage_assignment(2, 3, "v") == [0, 1, 1, 0, 0, 1]


def test_rank_mapping_round_trip_ep_fastest():
    pp, ep, dp = 3, 4, 2
    seen = set()
    for r in range(pp * ep * dp):
        p, e, d = mesh_coords(r, pp, ep, dp)
        assert global_rank(p, e, d, pp, ep, dp) == r
        seen.add((p, e, d))
    assert len(seen) == pp * ep * dp
    assert [global_rank(0, e, 0, pp, ep, dp) for e in range(ep)] == [0, 1, 2, 3]  # EP group is contiguous
    assert global_rank(1, 0, 0, pp, ep, dp) == 4 and global_rank(0, 0, 1, pp, ep, dp) == 12
    g = rank_grid(pp, ep, dp)
    assert g.shape == (pp, dp, ep) and g[2, 1, 3] == global_rank(2, 3, 1, pp, ep, dp)
    with pytest.raises(ValueError):
        global_rank(3, 0, 0, pp, ep, dp)


def test_json_round_trip_is_plain_json():
    p = static_plan(6, [1, 3, 5], 4, pp=2, ep=2, dp=3)
    p.expert_map[3][0] = [0, 1]  # a replica
    text = to_json(p)
    d = json.loads(text)
    assert d["expert_map"]["3"][0] == [0, 1] and d["dp"] == 3
    q = from_json(text)
    assert q == p and q.expert_map[3][0] == [0, 1]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda p: p.stage_layers.__setitem__(1, (4, 6)), r"plan.stage_layers\[1\]=\(4, 6\) breaks the cover"),
        (lambda p: p.stage_layers.__setitem__(1, (3, 3)), r"plan.stage_layers\[1\]"),
        (lambda p: p.stage_to_pp_rank.__setitem__(1, 5), r"plan.stage_to_pp_rank contains 5"),
        (lambda p: p.stage_to_pp_rank.__setitem__(1, 0), r"leaves pp rank 1 without a stage"),
        (lambda p: p.expert_map[1].__setitem__(0, []), r"plan.expert_map\[1\]\[0\] is empty"),
        (lambda p: p.expert_map[1].__setitem__(0, [0, 0]), r"distinct EP ranks"),
        (lambda p: p.expert_map[1].__setitem__(0, [2]), r"distinct EP ranks in \[0, ep=2\)"),
        (lambda p: p.expert_map[1].pop(), r"has 3 experts but moe.num_experts=4"),
        (lambda p: p.expert_map.pop(5), r"plan.expert_map covers layers"),
    ],
)
def test_validate_plan_errors(mutate, match):
    p = static_plan(6, [1, 3, 5], 4, pp=2, ep=2)
    mutate(p)
    with pytest.raises(ConfigError, match=match) as ei:
        validate_plan(p, 6, [1, 3, 5], 4)
    assert "\n" not in str(ei.value)


def test_validate_plan_layer_count_and_idle_ep_rank():
    p = static_plan(6, [1], 4, pp=2, ep=2)
    with pytest.raises(ConfigError, match="model.n_layers=8"):
        validate_plan(p, 8)
    p.expert_map[1][:] = [[0]] * 4
    with pytest.raises(ConfigError, match="leaves EP rank 1 without experts"):
        validate_plan(p)


def _holders_valid_by_loop(experts, ep):
    """validate_plan's per-expert checks, one expert at a time (the reference for the fast path)."""
    for ranks in experts:
        if not ranks or len(set(ranks)) != len(ranks) or any(not 0 <= r < ep for r in ranks):
            return False
    return ep == 1 or not set(range(ep)) - {r for rs in experts for r in rs}


def test_vectorised_holder_check_agrees_with_the_loop():
    rng = np.random.default_rng(0)
    faults = [
        lambda h: h.__setitem__(0, []),
        lambda h: h[-1].append(h[-1][0]),  # a rank listed twice
        lambda h: h[1].append(-1),
        lambda h: h[2].append(ep),
        lambda h: h.__setitem__(3, [1.5]),  # not an integer: the loop decides
        lambda h: h.__setitem__(3, [np.int64(0)]),  # numpy integers are integers
        lambda h: [x.remove(0) if len(x) > 1 else x.__setitem__(0, 1) for x in h if 0 in x],  # rank 0 left idle
        lambda h: None,
    ]
    for trial in range(60):
        ep = int(rng.integers(1, 9))
        E = int(rng.integers(max(ep, 4), 3 * ep + 5))
        h = [sorted(rng.choice(ep, size=int(rng.integers(1, ep + 1)), replace=False).tolist()) for _ in range(E)]
        for r in range(ep):  # every rank holds something
            if not any(r in x for x in h):
                h[int(rng.integers(E))].append(r)
        faults[trial % len(faults)](h)
        ref = _holders_valid_by_loop(h, ep)
        integral = all(isinstance(r, (int, np.integer)) for x in h for r in x)
        assert _holders_valid(h, ep) == ref if integral else not _holders_valid(h, ep)  # not integers: the loop decides
        p = Plan([(0, 1)], [0], {0: h}, 1, ep)
        if ref:
            validate_plan(p)
        else:
            with pytest.raises(ConfigError):
                validate_plan(p)


def test_static_plan_rejects_impossible_layouts():
    with pytest.raises(ConfigError, match="model.n_layers=4"):
        static_plan(4, [], 0, pp=4, virtual_stages=2)
    with pytest.raises(ConfigError, match="parallel.ep=16 > moe.num_experts=8"):
        static_plan(4, [0], 8, pp=1, ep=16)
