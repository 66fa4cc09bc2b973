"""The native MoE layer against a naive per-token loop written here.

The reference routes every token on its own (sort its scores, take k, renormalise), applies
capacity by walking assignments in priority order with a counter per expert, and sums
weight * expert(x_t) over the surviving choices. It shares only the parameters with the
layer, not any of its code. Everything runs in fp64 except the router logits, which the
layer computes in fp32 by design (the reference does the same cast).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from moepipe.config import ModelConfig, MoEConfig
from moepipe.model.moe import AttachAuxLoss, MoELayer
from moepipe.model.transformer import build_model, lm_loss

D, E = 8, 4
TOL = dict(rtol=1e-6, atol=1e-9)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- reference


def reference_moe(layer: MoELayer, x: torch.Tensor):
    """Naive loop: returns (out [T, d], aux, z, demand[E], kept[E], dropped)."""
    cfg = layer.cfg
    k, num_e = cfg.top_k, cfg.num_experts
    T = x.shape[0]
    logits = x.float() @ layer.router.weight.float().t()
    scores = torch.softmax(logits, -1) if cfg.score_func == "softmax" else torch.sigmoid(logits)
    bias = layer.router.expert_bias

    chosen, weights = [], []
    for t in range(T):
        sel = [float(scores[t, e].detach()) + (float(bias[e]) if bias is not None else 0.0) for e in range(num_e)]
        experts = sorted(range(num_e), key=lambda e: -sel[e])[:k]
        ws = [scores[t, e] for e in experts]
        if cfg.normalize_weights and k > 1 and not cfg.normalize_after_drop:
            total = sum(ws)
            ws = [w / total for w in ws]
        chosen.append(experts)
        weights.append(ws)

    demand = [0] * num_e
    for t in range(T):
        for e in chosen[t]:
            demand[e] += 1
    if cfg.capacity_factor == 0:
        cap = None
    else:
        share = math.ceil(k * abs(cfg.capacity_factor) * T / num_e)
        cap = share if cfg.capacity_factor > 0 else min(max(demand), share)

    prio = [(t, j) for j in range(k) for t in range(T)]  # all first choices, then second ...
    if cfg.drop_policy == "score":
        prio = sorted(prio, key=lambda tj: -float(scores[tj[0], chosen[tj[0]][tj[1]]].detach()))  # raw scores; stable sort keeps ties in that order
    count = [0] * num_e
    survived = set()
    for t, j in prio:
        e = chosen[t][j]
        if cap is None or count[e] < cap:
            survived.add((t, j))
            count[e] += 1

    rows = []
    for t in range(T):
        keep = [j for j in range(k) if (t, j) in survived]
        ws = weights[t]
        if cfg.normalize_weights and k > 1 and cfg.normalize_after_drop and keep:
            total = sum(ws[j] for j in keep)
            ws = [w / total for w in ws]
        y = torch.zeros(x.shape[-1], dtype=x.dtype)
        for j in keep:
            y = y + ws[j].to(x.dtype) * layer.experts[str(chosen[t][j])](x[t : t + 1])[0]
        if layer.shared is not None:
            y = y + layer.shared(x[t : t + 1])[0]
        rows.append(y)
    out = torch.stack(rows)

    probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    counted = [c[:1] if cfg.aux_loss_type == "top1" else c for c in chosen]
    n = sum(len(c) for c in counted)
    f = torch.zeros(num_e)
    for c in counted:
        for e in c:
            f[e] += 1.0 / n
    aux = num_e * (f * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    return out, aux, z, torch.tensor(demand), torch.tensor(count), T * k - len(survived)


# ----------------------------------------------------------------------------- fixtures


def make_layer(seed=0, **kw) -> MoELayer:
    base = dict(num_experts=E, top_k=2, expert_hidden=12, aux_loss_coef=0.0, z_loss_coef=0.0)
    base.update(kw)
    cfg = MoEConfig(**base)
    torch.manual_seed(seed)
    layer = MoELayer(D, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        layer.router.weight[0, 0] += 2.0  # expert 0 popular: capacities bite
    return layer.double()


def make_input(seed=1, shape=(2, 7, D)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[..., 0] += 1.0
    return x


def grads(module, x):
    out = {"x": x.grad.clone()}
    for name, p in module.named_parameters():
        out[name] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return out


def zero_grads(module, x):
    x.grad = None
    for p in module.parameters():
        p.grad = None


def assert_grads_close(a, b, **tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


CONFIGS = {
    "k1_softmax_dropless": dict(top_k=1),
    "k2_softmax_position_capped": dict(top_k=2, capacity_factor=0.5),
    "k2_softmax_score_capped_norm_after_drop": dict(top_k=2, capacity_factor=1.0, drop_policy="score", normalize_after_drop=True),
    "k2_softmax_unnormalised_capped": dict(top_k=2, capacity_factor=0.75, normalize_weights=False),
    "k3_sigmoid_score_tutel_cap": dict(top_k=3, score_func="sigmoid", capacity_factor=-0.75, drop_policy="score"),
    "k3_softmax_position_norm_after_drop": dict(top_k=3, capacity_factor=0.5, normalize_after_drop=True),
    "k2_sigmoid_dropless_shared": dict(top_k=2, score_func="sigmoid", num_shared_experts=2, shared_expert_hidden=6),
    "k2_softmax_bias_capped_shared": dict(top_k=2, capacity_factor=0.5, bias_update_rate=0.01, num_shared_experts=1),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_match_naive_loop(name):
    kw = CONFIGS[name]
    layer = make_layer(**kw)
    if layer.router.expert_bias is not None:
        layer.router.expert_bias.copy_(torch.tensor([-0.3, 0.0, 0.25, 0.1]))
    layer.train()
    x = make_input().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    out = layer(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    (out * g).sum().backward()
    got = grads(layer, x)
    stats = layer.stats

    zero_grads(layer, x)
    ref, aux, z, demand, kept, dropped = reference_moe(layer, x.reshape(-1, D))
    ref = ref.reshape(x.shape)
    (ref * g).sum().backward()
    want = grads(layer, x)

    torch.testing.assert_close(out, ref, **TOL)
    assert_grads_close(got, want, **TOL)
    assert float(want["router.weight"].abs().max()) > 1e-4  # the router really gets a gradient

    capped = kw.get("capacity_factor", 0.0) != 0
    assert (dropped > 0) == capped, f"config must {'drop' if capped else 'not drop'} (dropped={dropped})"
    assert stats.calls == 1
    assert stats.demand.tolist() == demand.tolist()
    assert stats.kept.tolist() == kept.tolist()
    assert stats.asked == x.shape[0] * x.shape[1] * layer.cfg.top_k
    assert stats.asked - int(stats.kept.sum()) == dropped
    assert stats.aux_loss_sum == pytest.approx(float(aux.detach()), rel=1e-5)
    assert stats.z_loss_sum == pytest.approx(float(z.detach()), rel=1e-5)


def test_selection_bias_changes_layer_output():
    layer = make_layer(bias_update_rate=0.01)
    x = make_input()
    base = layer(x).detach()
    layer.router.expert_bias.copy_(torch.tensor([-10.0, 0.0, 0.0, 0.0]))  # nobody picks expert 0
    biased = layer(x).detach()
    assert not torch.allclose(base, biased)
    assert layer.stats.demand.tolist()[0] > 0 and layer.stats.calls == 2
    torch.testing.assert_close(biased, reference_moe(layer, x.reshape(-1, D))[0].reshape(x.shape), **TOL)


def test_update_expert_bias_uses_recorded_demand():
    layer = make_layer(bias_update_rate=0.5)
    layer(make_input())
    demand = layer.stats.demand.double()
    layer.update_expert_bias()
    torch.testing.assert_close(layer.router.expert_bias.double(), 0.5 * torch.sign(demand.mean() - demand))


def test_stats_accumulate_and_reset():
    layer = make_layer(top_k=2, capacity_factor=0.5)
    x1, x2 = make_input(1), make_input(5, shape=(3, 4, D))
    layer(x1)
    layer(x2)
    d1, k1 = reference_moe(layer, x1.reshape(-1, D))[3:5]
    d2, k2 = reference_moe(layer, x2.reshape(-1, D))[3:5]
    assert layer.stats.calls == 2
    assert layer.stats.demand.tolist() == (d1 + d2).tolist()
    assert layer.stats.kept.tolist() == (k1 + k2).tolist()
    assert layer.stats.asked == 2 * (14 + 12)
    layer.record_stats = False
    layer(x1)
    assert layer.stats.calls == 2
    layer.stats.reset()
    assert layer.stats.calls == 0 and int(layer.stats.demand.sum()) == 0 and layer.stats.asked == 0


# ----------------------------------------------------------------------------- aux losses


@pytest.mark.parametrize("aux_type", ["switch", "top1"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_attach_aux_loss_gradient_equals_explicit_total_loss(aux_type, score_func):
    aux_coef, z_coef, scale = 0.3, 0.05, 0.25
    layer = make_layer(top_k=2, capacity_factor=0.5, aux_loss_coef=aux_coef, z_loss_coef=z_coef, aux_loss_type=aux_type, score_func=score_func)
    layer.aux_loss_scale = scale
    layer.train()
    x = make_input().requires_grad_(True)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    out = layer(x)
    (out * g).sum().backward()
    got = grads(layer, x)

    zero_grads(layer, x)
    ref, aux, z, *_ = reference_moe(layer, x.reshape(-1, D))
    torch.testing.assert_close(out.detach(), ref.detach().reshape(x.shape), **TOL)  # the value is untouched
    main = (ref.reshape(x.shape) * g).sum()
    main.backward(retain_graph=True)
    main_only = grads(layer, x)
    zero_grads(layer, x)
    (main + scale * (aux_coef * aux + z_coef * z)).backward()
    want = grads(layer, x)

    assert_grads_close(got, want, rtol=1e-6, atol=1e-8)
    # the aux part is not negligible, so a layer that dropped it would fail above
    delta = (want["router.weight"] - main_only["router.weight"]).abs().max()
    assert float(delta) > 1e-3 * float(want["router.weight"].abs().max())
    assert float((want["x"] - main_only["x"]).abs().max()) > 0


def test_aux_loss_not_attached_in_eval_or_no_grad():
    layer = make_layer(aux_loss_coef=1.0, z_loss_coef=1.0)
    x = make_input().requires_grad_(True)
    layer.eval()
    out = layer(x)
    assert out.grad_fn is None or "AttachAuxLoss" not in type(out.grad_fn).__name__
    layer.train()
    with torch.no_grad():
        assert layer(x).grad_fn is None
    out_train = layer(x)
    assert "AttachAuxLoss" in type(out_train.grad_fn).__name__


def test_attach_aux_loss_function():
    a = torch.randn(3, 2, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    out = AttachAuxLoss.apply(a * 1.0, 3.0 * w**2)
    torch.testing.assert_close(out, a)
    (out * 5).sum().backward()
    torch.testing.assert_close(a.grad, torch.full((3, 2), 5.0))
    torch.testing.assert_close(w.grad, torch.tensor(12.0))  # d(3 w^2)/dw, seeded with 1


# ----------------------------------------------------------------------------- activation checkpointing


def _model_pair():
    mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, ffn_hidden=48, max_seq_len=16)
    ecfg = MoEConfig(
        num_experts=4, top_k=2, expert_hidden=24, every=1, first_dense=1, capacity_factor=1.0,
        router_jitter=0.2, aux_loss_coef=0.1, z_loss_coef=0.01, num_shared_experts=1,
    )
    torch.manual_seed(0)
    plain = build_model(mcfg, ecfg)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    return plain, ckpt


def test_activation_checkpointing_same_gradients_and_stats_once():
    plain, ckpt = _model_pair()
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (plain, ckpt):
        model.train()
        model.set_aux_loss_scale(0.5)
        calls = {}
        # a pre-hook: non-reentrant checkpointing stops the recompute early, before forward returns
        hooks = [m.register_forward_pre_hook(lambda mod, i, lid=lid: calls.__setitem__(lid, calls.get(lid, 0) + 1)) for lid, m in model.moe_layers()]
        torch.manual_seed(123)  # the jitter draws
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        for h in hooks:
            h.remove()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stats = {lid: (h.calls, h.demand.tolist(), h.kept.tolist(), h.asked, h.aux_loss_sum) for lid, h in ((lid, m.stats.host()) for lid, m in model.moe_layers())}
        results.append((loss.item(), g, stats, calls))

    (l0, g0, s0, c0), (l1, g1, s1, c1) = results
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert g0.keys() == g1.keys() and any(".router.weight" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    assert sorted(s0) == [1, 2]
    assert c0 == {1: 1, 2: 1}
    assert c1 == {1: 2, 2: 2}, "checkpointing must recompute the MoE block in backward"
    for lid in s0:
        assert s1[lid][0] == 1, "recomputation counted the tokens twice"
        assert s1[lid][1:4] == s0[lid][1:4]
        assert s1[lid][3] == 4 * 15 * 2
        assert s1[lid][4] == pytest.approx(s0[lid][4], rel=1e-6)
    for _, m in ckpt.moe_layers():
        assert m.record_stats is True  # restored after the recompute


def test_checkpointing_off_in_eval():
    _, ckpt = _model_pair()
    ckpt.eval()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ckpt(tokens)
    assert all(m.stats.calls == 1 for _, m in ckpt.moe_layers())
