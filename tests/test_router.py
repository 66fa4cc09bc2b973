"""Router unit tests against values computed by hand on tiny explicit logits.

Most logits are log-probabilities (rows of `P4` sum to one), so softmax returns exactly those
probabilities and every expected weight, capacity and loss below is plain arithmetic.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moepipe.model.router import Router, count_per_expert, expert_capacity, load_balancing_loss, route, router_z_loss


pytestmark = pytest.mark.usefixtures("one_thread")

# T=4 tokens, E=3 experts. Top-2 choices (best first):
#   t0 -> (0, 1) scores .5 .3   normalised 5/8 3/8
#   t1 -> (1, 2) scores .6 .3   normalised 2/3 1/3
#   t2 -> (2, 0) scores .6 .25  normalised 12/17 5/17
#   t3 -> (0, 1) scores .7 .2   normalised 7/9 2/9
# demand: e0 = {t0 1st, t3 1st, t2 2nd} = 3, e1 = {t1 1st, t0 2nd, t3 2nd} = 3, e2 = {t2 1st, t1 2nd} = 2
P4 = torch.tensor(
    [
        [0.50, 0.30, 0.20],
        [0.10, 0.60, 0.30],
        [0.25, 0.15, 0.60],
        [0.70, 0.20, 0.10],
    ],
    dtype=torch.float64,
)
LOGITS4 = P4.log().float()

NORM4 = {
    (0, 0): 5 / 8, (0, 1): 3 / 8,
    (1, 1): 2 / 3, (1, 2): 1 / 3,
    (2, 2): 12 / 17, (2, 0): 5 / 17,
    (3, 0): 7 / 9, (3, 1): 2 / 9,
}
RAW4 = {
    (0, 0): 0.5, (0, 1): 0.3,
    (1, 1): 0.6, (1, 2): 0.3,
    (2, 2): 0.6, (2, 0): 0.25,
    (3, 0): 0.7, (3, 1): 0.2,
}


def assignments(r) -> dict:
    """{(token, expert): weight} of the surviving assignments; also checks the Routing invariants."""
    tok, exp, w = r.token_idx.tolist(), r.expert_idx.tolist(), r.weights.tolist()
    assert len(tok) == len(exp) == len(w)
    assert exp == sorted(exp), "assignments must be sorted by expert"
    assert len(set(zip(tok, exp))) == len(tok), "a (token, expert) pair appears twice"
    assert torch.bincount(r.expert_idx, minlength=r.kept_counts.numel()).tolist() == r.kept_counts.tolist()
    assert r.weights.dtype == torch.float32
    # every assignment stays in the arrays (static shapes): the dropped ones trail with expert E, weight 0
    n, num_e = r.all_token_idx.numel(), r.kept_counts.numel()
    assert n == r.all_expert_idx.numel() == r.all_weights.numel() == int(r.demand_counts.sum())
    assert r.all_expert_idx[len(tok):].eq(num_e).all() and r.all_weights[len(tok):].eq(0).all()
    per_token = torch.bincount(r.all_token_idx)
    assert per_token.min() == per_token.max(), "each token has its k assignments, kept or dropped"
    return {(t, e): x for t, e, x in zip(tok, exp, w)}


def assert_assignments(r, expected: dict, tol=1e-6):
    got = assignments(r)
    assert set(got) == set(expected), f"kept {sorted(got)} != expected {sorted(expected)}"
    for key, w in expected.items():
        assert got[key] == pytest.approx(w, abs=tol), key


# ----------------------------------------------------------------------------- choice and weights


def test_top2_softmax_normalised_weights():
    r = route(LOGITS4, 2, score_func="softmax", capacity_factor=0.0)
    assert_assignments(r, NORM4)
    assert r.demand_counts.tolist() == [3, 3, 2]
    assert r.kept_counts.tolist() == [3, 3, 2]
    assert r.capacity is None and r.num_dropped == 0


def test_top2_softmax_unnormalised_weights_are_scores():
    r = route(LOGITS4, 2, score_func="softmax", normalize_weights=False)
    assert_assignments(r, RAW4)


def test_top1_softmax_weight_is_probability_not_one():
    # k=1 never renormalises (it would make every weight 1 and kill the router's gradient).
    r = route(LOGITS4, 1, score_func="softmax", normalize_weights=True)
    assert_assignments(r, {(0, 0): 0.5, (1, 1): 0.6, (2, 2): 0.6, (3, 0): 0.7})
    assert r.demand_counts.tolist() == [2, 1, 1]


def test_top3_of_3_keeps_all_experts_with_softmax_weights():
    r = route(LOGITS4, 3, score_func="softmax", normalize_weights=True)
    expected = {(t, e): float(P4[t, e]) for t in range(4) for e in range(3)}  # rows already sum to 1
    assert_assignments(r, expected)


def test_shift_invariance_of_softmax_routing():
    shift = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    r = route(LOGITS4 + shift, 2)
    assert_assignments(r, NORM4)


# sigmoid(log 3) = .75, sigmoid(0) = .5, sigmoid(-log 3) = .25, sigmoid(log 4) = .8, sigmoid(-log 4) = .2
SIG_LOGITS = torch.tensor(
    [
        [math.log(3), 0.0, -math.log(3)],  # scores .75 .5 .25
        [0.0, math.log(4), -math.log(4)],  # scores .5 .8 .2
    ]
)


def test_top2_sigmoid_normalised():
    r = route(SIG_LOGITS, 2, score_func="sigmoid", normalize_weights=True)
    assert_assignments(r, {(0, 0): 0.6, (0, 1): 0.4, (1, 1): 0.8 / 1.3, (1, 0): 0.5 / 1.3})


def test_top2_sigmoid_unnormalised():
    r = route(SIG_LOGITS, 2, score_func="sigmoid", normalize_weights=False)
    assert_assignments(r, {(0, 0): 0.75, (0, 1): 0.5, (1, 1): 0.8, (1, 0): 0.5})


def test_top1_sigmoid_weight_is_the_sigmoid():
    r = route(SIG_LOGITS, 1, score_func="sigmoid", normalize_weights=True)
    assert_assignments(r, {(0, 0): 0.75, (1, 1): 0.8})


def test_weights_carry_gradient_to_logits():
    logits = LOGITS4.clone().requires_grad_(True)
    r = route(logits, 2, normalize_weights=False)
    # d w_(0,0) / d logit_(0,j) = p0 (delta_0j - p_j) for the softmax
    w = assignments(r)
    idx = [k for k in range(r.token_idx.numel()) if (int(r.token_idx[k]), int(r.expert_idx[k])) == (0, 0)][0]
    r.weights[idx].backward()
    p = P4[0].float()
    expected = p[0] * (torch.tensor([1.0, 0.0, 0.0]) - p)
    torch.testing.assert_close(logits.grad[0], expected, rtol=1e-5, atol=1e-7)
    assert torch.all(logits.grad[1:] == 0)
    assert w[(0, 0)] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- capacity


def test_expert_capacity_formula():
    demand = torch.tensor([3, 3, 2])
    assert expert_capacity(4, 3, 2, 0.0, demand) is None
    assert expert_capacity(4, 3, 2, 1.0, demand) == 3  # ceil(8/3)
    assert expert_capacity(4, 3, 2, 0.5, demand) == 2  # ceil(4/3)
    assert expert_capacity(4, 3, 2, 0.25, demand) == 1  # ceil(2/3)
    assert expert_capacity(4, 3, 2, 1.5, demand) == 4  # ceil(4)
    assert expert_capacity(4, 3, 2, -1.5, demand) == 3  # min(busiest demand 3, ceil(4))
    assert expert_capacity(4, 3, 2, -0.5, demand) == 2  # min(3, ceil(4/3))
    assert expert_capacity(4, 3, 2, -0.25, demand) == 1
    assert expert_capacity(64, 8, 2, 1.0, torch.tensor([16] * 8)) == 16  # 2T/E as in GShard


def test_capacity_large_enough_drops_nothing():
    r = route(LOGITS4, 2, capacity_factor=1.0)
    assert r.capacity == 3
    assert_assignments(r, NORM4)
    assert r.num_dropped == 0


def test_capacity_two_position_policy():
    # cap 2. e0 queue: t0(1st) t3(1st) | t2(2nd) -> drop (2,0)
    #        e1 queue: t1(1st) | t0(2nd) t3(2nd) -> drop (3,1)
    #        e2 queue: t2(1st) | t1(2nd)          -> keep both
    r = route(LOGITS4, 2, capacity_factor=0.5, drop_policy="position")
    assert r.capacity == 2
    expected = {k: v for k, v in NORM4.items() if k not in {(2, 0), (3, 1)}}
    assert_assignments(r, expected)  # weights normalised before the drop: not renormalised
    assert r.kept_counts.tolist() == [2, 2, 2]
    assert r.demand_counts.tolist() == [3, 3, 2]
    assert r.num_dropped == 2


def test_capacity_two_normalize_after_drop():
    r = route(LOGITS4, 2, capacity_factor=0.5, normalize_after_drop=True)
    # survivors renormalised per token: t2 and t3 keep one expert each, with weight 1
    expected = {(0, 0): 5 / 8, (0, 1): 3 / 8, (1, 1): 2 / 3, (1, 2): 1 / 3, (2, 2): 1.0, (3, 0): 1.0}
    assert_assignments(r, expected)


def test_capacity_one_position_vs_score_policy():
    # cap 1: first choices queue in token order. e0 has first choices t0 (5/8) and t3 (7/9).
    pos = route(LOGITS4, 2, capacity_factor=0.25, drop_policy="position")
    assert pos.capacity == 1
    assert_assignments(pos, {(0, 0): 5 / 8, (1, 1): 2 / 3, (2, 2): 12 / 17})
    score = route(LOGITS4, 2, capacity_factor=0.25, drop_policy="score")
    assert_assignments(score, {(3, 0): 7 / 9, (1, 1): 2 / 3, (2, 2): 12 / 17})
    assert pos.num_dropped == score.num_dropped == 5


def test_capacity_one_normalize_after_drop_gives_unit_weights_and_drops_whole_tokens():
    r = route(LOGITS4, 2, capacity_factor=0.25, normalize_after_drop=True)
    assert_assignments(r, {(0, 0): 1.0, (1, 1): 1.0, (2, 2): 1.0})  # t3 loses both choices


# T=2, E=3: t0 scores (.5, .45, .05) -> first e0, second e1; t1 scores (.35, .4, .25) -> first e1, second e0.
# Raw second choice (0, e1)=.45 beats raw first choice (1, e1)=.40; after normalisation it does not
# (.45/.95 = .474 < .4/.75 = .533).
P2 = torch.tensor([[0.5, 0.45, 0.05], [0.35, 0.4, 0.25]], dtype=torch.float64)


def test_score_policy_second_choice_can_beat_first_choice():
    logits = P2.log().float()
    pos = route(logits, 2, capacity_factor=0.5, drop_policy="position", normalize_weights=False)
    assert pos.capacity == 1
    assert_assignments(pos, {(0, 0): 0.5, (1, 1): 0.4})
    score = route(logits, 2, capacity_factor=0.5, drop_policy="score", normalize_weights=False)
    assert_assignments(score, {(0, 0): 0.5, (0, 1): 0.45})
    # the policy ranks raw router scores, whatever the normalisation flags: same survivors
    score_n = route(logits, 2, capacity_factor=0.5, drop_policy="score", normalize_weights=True)
    assert_assignments(score_n, {(0, 0): 0.5 / 0.95, (0, 1): 0.45 / 0.95})
    score_after = route(logits, 2, capacity_factor=0.5, drop_policy="score", normalize_after_drop=True)
    assert_assignments(score_after, {(0, 0): 0.5 / 0.95, (0, 1): 0.45 / 0.95})


def test_negative_capacity_factor_caps_at_busiest_demand():
    # cf=-1.5: ceil(1.5*2*4/3)=4 but the busiest expert needs 3: cap 3, nothing dropped
    r = route(LOGITS4, 2, capacity_factor=-1.5)
    assert r.capacity == 3
    assert_assignments(r, NORM4)
    # cf=+1.5 would give 4
    assert route(LOGITS4, 2, capacity_factor=1.5).capacity == 4


@pytest.mark.parametrize("policy", ["position", "score"])
def test_negative_capacity_factor_below_demand_drops_like_positive(policy):
    neg = route(LOGITS4, 2, capacity_factor=-0.5, drop_policy=policy)
    posr = route(LOGITS4, 2, capacity_factor=0.5, drop_policy=policy)
    assert neg.capacity == posr.capacity == 2
    assert assignments(neg) == assignments(posr)
    neg1 = route(LOGITS4, 2, capacity_factor=-0.25, drop_policy=policy)
    assert neg1.capacity == 1
    expected = {(0, 0): 5 / 8} if policy == "position" else {(3, 0): 7 / 9}
    expected.update({(1, 1): 2 / 3, (2, 2): 12 / 17})
    assert_assignments(neg1, expected)


def test_dropless_keeps_everything_even_when_skewed():
    # every token's first choice is expert 0: a capped router would drop, dropless must not
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]] * 6)
    r = route(logits, 2, capacity_factor=0.0)
    assert r.capacity is None
    assert r.demand_counts.tolist() == [6, 6, 0, 0]
    assert r.kept_counts.tolist() == [6, 6, 0, 0]
    assert sorted(assignments(r)) == sorted([(t, 0) for t in range(6)] + [(t, 1) for t in range(6)])
    capped = route(logits, 2, capacity_factor=1.0)  # ceil(2*6/4) = 3
    assert capped.capacity == 3
    assert capped.kept_counts.tolist() == [3, 3, 0, 0]
    assert sorted(assignments(capped)) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_capped_routing_keeps_static_shapes_dropped_assignments_trail():
    # cap 1 on LOGITS4: 3 kept, 5 dropped. Shapes are T*k whatever the cap, so routing needs no
    # host read; the dropped (token, expert) pairs are exactly the chosen ones not kept.
    r = route(LOGITS4, 2, capacity_factor=0.25)
    assert r.all_token_idx.shape == r.all_expert_idx.shape == r.all_weights.shape == (8,)
    assert r.num_kept == 3 and r.token_idx.numel() == 3
    assert r.all_expert_idx.tolist() == [0, 1, 2, 3, 3, 3, 3, 3]
    kept = set(zip(r.token_idx.tolist(), r.expert_idx.tolist()))
    tail = sorted(r.all_token_idx[3:].tolist())
    dropped_tokens = sorted(t for (t, e) in NORM4 if (t, e) not in kept)
    assert tail == dropped_tokens
    assert r.all_weights[3:].tolist() == [0.0] * 5


def test_tutel_capacity_is_a_device_scalar_not_a_host_int():
    demand = torch.tensor([3, 3, 2])
    cap = expert_capacity(4, 3, 2, -1.5, demand)
    assert isinstance(cap, torch.Tensor) and cap.dim() == 0 and cap.device == demand.device
    assert int(cap) == 3
    assert isinstance(expert_capacity(4, 3, 2, 1.0, demand), int)  # from shapes alone: a host int


def test_count_per_expert_equals_bincount():
    idx = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(0))
    assert count_per_expert(idx, 9).tolist() == torch.bincount(idx, minlength=9).tolist()
    assert count_per_expert(idx[:0], 4).tolist() == [0, 0, 0, 0]


# ----------------------------------------------------------------------------- losses

# mean probabilities P = (1.55, 1.25, 1.2) / 4 = (.3875, .3125, .3)
# switch: f = (3, 3, 2)/8  -> 3 * (.375*.3875 + .375*.3125 + .25*.3) = 1.0125
# top1:   f = (2, 1, 1)/4  -> 3 * (.5*.3875 + .25*.3125 + .25*.3)    = 1.040625


def test_switch_aux_loss_value():
    r = route(LOGITS4, 2, aux_loss_type="switch")
    assert float(r.aux_loss) == pytest.approx(1.0125, abs=1e-6)


def test_top1_aux_loss_value():
    r = route(LOGITS4, 2, aux_loss_type="top1")
    assert float(r.aux_loss) == pytest.approx(1.040625, abs=1e-6)


def test_aux_loss_counts_choices_before_capacity():
    full = route(LOGITS4, 2, capacity_factor=0.0)
    capped = route(LOGITS4, 2, capacity_factor=0.25)
    assert float(capped.aux_loss) == pytest.approx(float(full.aux_loss), abs=1e-7)


def test_aux_loss_gradient_flows_through_probabilities_only():
    logits = LOGITS4.clone().requires_grad_(True)
    route(logits, 2, aux_loss_type="switch").aux_loss.backward()
    # d/dlogits of E * sum_e f_e mean_t p_te, f constant: (E/T) p_t (f - <f, p_t>)
    f = torch.tensor([3, 3, 2], dtype=torch.float64) / 8
    expected = 3 / 4 * P4 * (f - (P4 * f).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_sigmoid_aux_loss_uses_normalised_scores():
    # scores (.75 .5 .25) and (.5 .8 .2), both sum 1.5 -> p = (1/2 1/3 1/6), (1/3 8/15 2/15)
    # P = (5/12, 13/30, 3/20); top-2 choices {0,1} and {1,0}: f = (1/2, 1/2, 0)
    r = route(SIG_LOGITS, 2, score_func="sigmoid", aux_loss_type="switch")
    assert float(r.aux_loss) == pytest.approx(3 * (0.5 * 5 / 12 + 0.5 * 13 / 30), abs=1e-6)


def test_load_balancing_loss_uniform_is_one():
    probs = torch.full((6, 3), 1 / 3)
    choices = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2], [2, 0]])
    assert float(load_balancing_loss(probs, choices, 3, top1_only=False)) == pytest.approx(1.0)
    assert float(load_balancing_loss(probs, choices, 3, top1_only=True)) == pytest.approx(1.0)


def test_z_loss_value():
    # logits = log p + c_t have logsumexp c_t: z = mean(c^2) = (1 + 4 + .25 + 9)/4
    shift = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    r = route(LOGITS4 + shift, 2)
    assert float(r.z_loss) == pytest.approx(3.5625, abs=1e-5)
    assert float(route(LOGITS4, 2).z_loss) == pytest.approx(0.0, abs=1e-10)
    # zeros: logsumexp = log E
    assert float(router_z_loss(torch.zeros(5, 4))) == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_z_loss_gradient():
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)  # lse = log 4, softmax (1/4, 3/4)
    router_z_loss(logits).backward()
    torch.testing.assert_close(logits.grad, 2 * math.log(4) * torch.tensor([[0.25, 0.75]]))


# ----------------------------------------------------------------------------- selection bias


def test_selection_bias_changes_choice_not_weights():
    bias = torch.tensor([0.0, 0.0, 0.4])
    # t0 select on (.5, .3, .6): top-1 expert 2 with weight .2 (the unbiased score)
    r1 = route(LOGITS4, 1, selection_bias=bias)
    got = assignments(r1)
    assert got[(0, 2)] == pytest.approx(0.2)
    # t1 (.1 .6 .7): e2 .3 ; t2 (.25 .15 1.0): e2 .6 ; t3 (.7 .2 .5): e0 .7
    assert_assignments(r1, {(0, 2): 0.2, (1, 2): 0.3, (2, 2): 0.6, (3, 0): 0.7})
    # top-2: t0 picks (2, 0) with normalised unbiased weights .2/.7, .5/.7
    r2 = route(LOGITS4, 2, selection_bias=bias)
    got2 = assignments(r2)
    assert got2[(0, 2)] == pytest.approx(2 / 7) and got2[(0, 0)] == pytest.approx(5 / 7)
    assert (0, 1) not in got2
    # the bias does not touch the probabilities in the aux loss, only the counted choices
    assert r1.demand_counts.tolist() == [1, 0, 3]


def test_zero_selection_bias_is_no_bias():
    r = route(LOGITS4, 2, selection_bias=torch.zeros(3))
    assert_assignments(r, NORM4)


def test_selection_bias_gets_no_gradient_path_into_weights():
    logits = LOGITS4.clone().requires_grad_(True)
    bias = torch.tensor([0.0, 0.0, 0.4], requires_grad=True)
    r = route(logits, 1, selection_bias=bias)
    assert r.weights.requires_grad
    r.weights.sum().backward()
    assert bias.grad is None or torch.all(bias.grad == 0)


# ----------------------------------------------------------------------------- Router module


def test_router_update_bias_sign_update():
    router = Router(4, 3, use_bias=True)
    assert router.expert_bias.tolist() == [0.0, 0.0, 0.0]
    router.update_bias(torch.tensor([10, 2, 6]), rate=0.1)  # mean 6: over, under, even
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0]))
    router.update_bias(torch.tensor([1, 5, 0]), rate=0.1)  # mean 2: under, over, under
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.0, 0.0, 0.1]))
    assert not router.expert_bias.requires_grad
    assert "expert_bias" in router.state_dict()


def test_router_without_bias_ignores_update():
    router = Router(4, 3, use_bias=False)
    assert router.expert_bias is None
    router.update_bias(torch.tensor([10, 2, 6]), rate=0.1)
    assert router.expert_bias is None


def test_router_logits_are_fp32_linear():
    torch.manual_seed(0)
    router = Router(8, 4)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, 8).bfloat16()
    out = router.logits(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x.float(), router.weight))


def test_router_jitter_only_in_training():
    torch.manual_seed(0)
    j = 0.25
    router = Router(4, 4, jitter=j)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))  # logits = jittered input itself
    x = torch.rand(64, 4) + 0.5
    router.eval()
    torch.testing.assert_close(router.logits(x), x)
    torch.testing.assert_close(router.logits(x), x)
    router.train()
    with torch.no_grad():
        a, b = router.logits(x), router.logits(x)
    assert not torch.equal(a, x) and not torch.equal(a, b)
    ratio = a / x
    assert float(ratio.min()) >= 1 - j - 1e-6 and float(ratio.max()) <= 1 + j + 1e-6
    assert float(ratio.max() - ratio.min()) > j  # the noise really spans the interval
    # no jitter configured: training logits are exact
    plain = Router(4, 4, jitter=0.0)
    plain.weight.data.copy_(torch.eye(4))
    plain.train()
    torch.testing.assert_close(plain.logits(x), x)
