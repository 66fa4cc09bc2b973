"""The native layer in its fairscale-compatible configuration against fairscale's MOELayer(Top2Gate).

Compatible configuration: top-2 softmax, capacity 2T/E (capacity_factor=1.0 with T % E == 0),
first choices queue before second ones, weights renormalised over the surviving choices, and
the GShard aux loss on first choices only. fairscale's Gumbel noise on the second choice is
patched to zero; both layers share the gate weight and the very same expert modules.

fairscale's l_aux is mean_e(me * ce) = sum_e(f_e P_e) / E, the native top1 loss is
E * sum_e(f_e P_e): they differ by the constant E^2.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

fairscale_moe = pytest.importorskip("fairscale.nn.moe")
import fairscale.nn.moe.top2gate as top2gate  # noqa: E402

from moepipe.config import ModelConfig, MoEConfig  # noqa: E402
from moepipe.model.fairscale_moe import FairscaleMoE, ensure_process_group  # noqa: E402
from moepipe.model.moe import MoELayer  # noqa: E402
from moepipe.model.transformer import build_model, lm_loss  # noqa: E402

D = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def process_group():
    """A 1-process gloo group for the module; torn down only if this module made it."""
    created = not dist.is_initialized()
    ensure_process_group()
    assert dist.get_world_size() == 1
    yield dist.group.WORLD
    if created and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def no_gumbel(monkeypatch):
    monkeypatch.setattr(top2gate, "gumbel_rsample", lambda shape, device: torch.zeros(shape, device=device))


def compat_cfg(num_experts: int) -> MoEConfig:
    return MoEConfig(
        num_experts=num_experts, top_k=2, expert_hidden=24, capacity_factor=1.0, aux_loss_type="top1",
        normalize_after_drop=True, score_func="softmax", normalize_weights=True, drop_policy="position",
        aux_loss_coef=0.0, z_loss_coef=0.0,
    )


def make_pair(num_experts: int, seed: int, skew: float):
    torch.manual_seed(seed)
    native = MoELayer(D, compat_cfg(num_experts))
    for p in native.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        native.router.weight[0, 0] += skew  # pile tokens onto expert 0 so the capacity drops some
    gate = fairscale_moe.Top2Gate(D, num_experts)
    with torch.no_grad():
        gate.wg.weight.copy_(native.router.weight)
    experts = torch.nn.ModuleList(native.experts[str(e)] for e in range(num_experts))  # the same modules
    fs = fairscale_moe.MOELayer(gate, experts)
    return native, fs


@pytest.mark.parametrize("num_experts,tokens,skew", [(4, 32, 2.0), (8, 48, 3.0), (4, 16, 0.0)])
def test_native_matches_fairscale_top2(process_group, no_gumbel, num_experts, tokens, skew):
    native, fs = make_pair(num_experts, seed=num_experts + tokens, skew=skew)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(7))
    x[:, 0] += 1.0
    g = torch.randn(tokens, D, generator=torch.Generator().manual_seed(8))

    xn = x.clone().requires_grad_(True)
    native.eval()  # no aux attached: compare the FFN output itself
    out_n = native(xn)
    (out_n * g).sum().backward()
    grads_n = {"x": xn.grad.clone(), "gate": native.router.weight.grad.clone()}
    grads_n.update({f"e{n}": p.grad.clone() for n, p in native.experts.named_parameters() if p.grad is not None})
    native.zero_grad(set_to_none=True)

    xf = x.clone().reshape(tokens, 1, D).requires_grad_(True)  # fairscale wants (s, t, m)
    out_f = fs(xf).reshape(tokens, D)
    (out_f * g).sum().backward()
    grads_f = {"x": xf.grad.reshape(tokens, D).clone(), "gate": fs.gate.wg.weight.grad.clone()}
    grads_f.update({f"e{n}": p.grad.clone() for n, p in native.experts.named_parameters() if p.grad is not None})

    torch.testing.assert_close(out_n, out_f, rtol=1e-5, atol=1e-6)
    assert grads_n.keys() == grads_f.keys()
    for name in grads_n:
        torch.testing.assert_close(grads_n[name], grads_f[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # same kept set: fairscale's dispatch mask against the native kept counts
    logits = native.router.logits(x)
    _, _, dispatch = top2gate.top2gating(logits)
    fs_kept = dispatch.sum(dim=(0, 2)).long()
    stats = native.stats
    assert stats.kept.tolist() == fs_kept.tolist()
    assert stats.calls == 1
    if skew > 0:
        assert int(stats.asked - stats.kept.sum()) > 0, "this case must exercise capacity drops"

    # aux loss: native top1 = E^2 * fairscale l_aux
    assert stats.aux_loss_sum == pytest.approx(num_experts**2 * float(fs.l_aux.detach()), rel=1e-5)


def test_gumbel_noise_is_patched(process_group, no_gumbel):
    logits = torch.randn(8, 4)
    a = top2gate.top2gating(logits)[1]
    b = top2gate.top2gating(logits)[1]
    torch.testing.assert_close(a, b)


def test_fairscale_backend_in_model_trains(process_group):
    mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=16)
    ecfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=24, backend="fairscale", aux_loss_coef=0.1)
    torch.manual_seed(0)
    model = build_model(mcfg, ecfg)
    assert sum(1 for _ in model.moe_layers()) == 2
    assert all(isinstance(m, FairscaleMoE) for _, m in model.moe_layers())
    model.train()
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))  # B=4: divisible by E
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    assert torch.isfinite(loss)
    loss.backward()
    for lid, moe in model.moe_layers():
        gate_grad = moe.gate.gate.wg.weight.grad
        assert gate_grad is not None and torch.isfinite(gate_grad).all() and float(gate_grad.abs().max()) > 0
        expert_grads = [p.grad for p in moe.moe.experts.parameters() if p.grad is not None]
        assert expert_grads and all(torch.isfinite(gr).all() for gr in expert_grads)
        assert moe.stats.calls == 1
        assert moe.stats.asked == 4 * 8 * 2
        assert 0 < int(moe.stats.kept.sum()) <= 4 * 8 * 2
        assert int(moe.stats.kept.max()) <= 2 * 32 // 4  # fairscale's capacity 2T/E


def test_fairscale_aux_loss_reaches_gate(process_group):
    """The backend attaches aux_loss_coef * l_aux: with a zero main loss the gate still gets a gradient."""
    ecfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, backend="fairscale", aux_loss_coef=1.0)
    torch.manual_seed(0)
    moe = FairscaleMoE(D, ecfg)
    moe.train()
    x = torch.randn(8, D)
    out = moe(x)
    (out * 0).sum().backward()
    grad = moe.gate.gate.wg.weight.grad
    assert grad is not None and float(grad.abs().max()) > 0


def test_fairscale_backend_batch_not_divisible_by_experts(process_group):
    mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=16)
    ecfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=24, backend="fairscale")
    torch.manual_seed(0)
    model = build_model(mcfg, ecfg)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))  # B=2, B*T=16
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
