"""Robust plans (placer.objective): a plan scored over the forecast's load scenarios."""
from dataclasses import replace

import numpy as np
import pytest

from moepipe.config import ConfigError, compose_config, validate
from moepipe.placement.forecast import window
from moepipe.placement.placers import Evaluator, decide, make_placement
from moepipe.placement.placers.robust import hedge_load, scorer, weighted_quantile

from test_shadows import NVLINK, job


def test_weighted_quantile():
    t, w = np.array([3.0, 1.0, 2.0]), np.array([0.2, 0.5, 0.3])
    assert weighted_quantile(t, w, 0.5) == 1.0 and weighted_quantile(t, w, 0.51) == 2.0
    assert weighted_quantile(t, w, 0.8) == 2.0 and weighted_quantile(t, w, 0.81) == 3.0 and weighted_quantile(t, w, 1.0) == 3.0


def test_bad_objective_is_a_one_line_error():
    for over, msg in ((["placer.objective=best"], "placer.objective"), (["placer.quantile=0"], "placer.quantile"),
                      (["placer.objective=expected"], "placer.forecast=ema")):
        with pytest.raises(ConfigError, match=msg) as e:
            validate(compose_config(over))
        assert "\n" not in str(e.value)
    validate(compose_config(["placer.objective=quantile", "placer.forecast=window"]))  # a forecaster with scenarios: fine


def moving_job(seed=0):
    """deepseek_v2_lite on 8 GPUs, EP4: a hot block of 8 experts that moved 8 experts every
    5 steps (history), forecast by `window` (its scenarios are the stretches of the window)."""
    inp = job(NVLINK)
    E, moe = inp.spec.num_experts, inp.spec.moe_layers
    rng = np.random.default_rng(seed)

    def load(t):
        x = np.ones(E)
        x[(8 * (t // 5)) % E:][:8] = 6.0
        return x * rng.uniform(0.9, 1.1, E)

    hist = np.array([load(t) for t in range(20)])
    f = window(hist, 10, 0.8)
    return replace(inp, expert_load={l: f.mean for l in moe}, scenarios=[{l: s for l in moe} for s in f.scenarios],
                   scenario_weights=f.weights), f


@pytest.mark.parametrize("objective", ["expected", "quantile"])
def test_robust_topo_is_never_worse_than_its_mean_plan_or_eplb_on_the_objective(objective):
    inp, f = moving_job()
    inp = replace(inp, objective=objective, quantile=0.75)
    assert len(f.scenarios) > 1
    score = scorer(inp, Evaluator(inp))
    robust = make_placement("topo", inp, replica_slots=1)
    eplb = make_placement("eplb", inp, replica_slots=1)
    assert robust.meta["objective"] == objective and robust.meta["objective_s"] == pytest.approx(score(robust), rel=1e-12)
    # the mean-load plan and eplb are candidates: the chosen plan's objective is never worse
    assert set(robust.meta["candidates_s"]) >= {"mean", "eplb", "hedge", "static"}
    assert robust.meta["objective_s"] == min(robust.meta["candidates_s"].values())
    assert score(robust) <= score(eplb) * (1 + 1e-12)
    # the score is the objective of the scenarios' own simulated times
    t = np.array([Evaluator(replace(inp, expert_load=s, scenarios=None, objective="mean")).evaluate(robust).iteration_time_s for s in inp.scenarios])
    want = float(f.weights @ t) if objective == "expected" else weighted_quantile(t, f.weights, 0.75)
    assert score(robust) == pytest.approx(want, rel=1e-12)
    if objective == "expected":  # decide() compares the current and the proposed plan on the objective
        static = make_placement("static", inp)
        d = decide("topo", inp, static, 1, 10)
        assert d.predicted_old_s == pytest.approx(score(static), rel=1e-12) and d.predicted_new_s == pytest.approx(score(d.candidate), rel=1e-12)


def test_hedge_load_gives_every_scenario_hot_expert_a_large_share():
    inp, f = moving_job()
    h = hedge_load(inp)
    l = inp.spec.moe_layers[0]
    assert np.isclose(h[l].sum(), inp.expert_load[l].sum())
    hot = np.unique(np.concatenate([np.argsort(-s)[:8] for s in f.scenarios]))
    assert (h[l][hot] > np.median(h[l])).all()


def test_mean_objective_ignores_scenarios():
    inp, _ = moving_job()
    a = make_placement("topo", inp, replica_slots=1)
    b = make_placement("topo", replace(inp, scenarios=None, scenario_weights=None), replica_slots=1)
    assert a.expert_map == b.expert_map and a.stage_layers == b.stage_layers and "objective" not in a.meta
