"""Synthetic expert-load patterns: valid, smooth, deterministic, and shaped as documented."""
import numpy as np
import pytest

from moepipe.config import ConfigError
from moepipe.placement.workloads import WORKLOADS, expert_distribution, routing_counts


@pytest.mark.parametrize("kind", WORKLOADS)
def test_every_kind_is_a_smooth_deterministic_distribution(kind):
    for step in (0, 7, 120):
        p = expert_distribution(kind, step, layer=3, num_experts=16, ep=4, strength=4.0, seed=1)
        assert p.shape == (16,) and np.isclose(p.sum(), 1.0) and (p > 0).all()
        assert np.array_equal(p, expert_distribution(kind, step, 3, 16, ep=4, strength=4.0, seed=1))


def test_shapes_match_their_definitions():
    E = 8
    assert np.allclose(expert_distribution("none", 0, 0, E), 1 / E)
    hot = expert_distribution("hot_expert", 0, 2, E, strength=5.0)
    assert np.isclose(hot.max() / np.sort(hot)[-2], 5.0) and np.isclose(hot.max(), 5 / (5 + E - 1))
    rank = expert_distribution("hot_rank", 0, 0, E, ep=4, strength=3.0)
    assert np.allclose(rank[:2] / rank[2:].max(), 3.0)  # rank 0 holds experts 0, 1 under the static blocks
    z = np.sort(expert_distribution("zipf", 0, 0, E, strength=1.0))[::-1]
    assert np.allclose(z / z[0], 1.0 / np.arange(1, E + 1))
    # zipf and lognormal: a different expert order / skew per layer, same across steps
    assert not np.array_equal(expert_distribution("zipf", 0, 0, E), expert_distribution("zipf", 0, 1, E))
    assert np.array_equal(expert_distribution("lognormal", 0, 1, E, strength=1.0), expert_distribution("lognormal", 99, 1, E, strength=1.0))


def test_rotating_and_burst_follow_the_step():
    E = 8
    hot = [int(np.argmax(expert_distribution("rotating", s, 0, E, strength=4.0, period=10))) for s in (0, 9, 10, 25)]
    assert hot[0] == hot[1] and hot[2] == (hot[0] + 1) % E and hot[3] == (hot[0] + 2) % E
    assert np.allclose(expert_distribution("burst", 3, 0, E, strength=4.0, burst_every=5), 1 / E)
    assert expert_distribution("burst", 10, 0, E, strength=4.0, burst_every=5).max() > 1 / E


def test_routing_counts_scale_to_tokens_times_top_k():
    c = routing_counts("zipf", 0, [1, 3], 8, tokens=1000, top_k=2, strength=1.2)
    assert sorted(c) == [1, 3] and np.isclose(c[1].sum(), 2000) and (c[3] > 0).all()


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"workload kind='nope' is not known"):
        expert_distribution("nope", 0, 0, 8)
    with pytest.raises(ConfigError, match=r"strength=0"):
        expert_distribution("zipf", 0, 0, 8, strength=0)
