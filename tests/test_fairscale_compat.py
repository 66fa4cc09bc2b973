"""fairscale's MOELayer(Top2Gate) against the native layer, and moe.backend=fairscale in training.

Compatible configuration (conf/moe/fairscale.yaml): top-2 softmax, capacity 2T/E
(capacity_factor=1.0 with T % E == 0), first choices queue before second ones, weights
renormalised over the surviving choices, and the GShard aux loss on first choices only.
fairscale's Gumbel noise on the second choice is patched to zero wherever numbers are compared
(`no_gumbel`; in workers, `_zero_gumbel`).

fairscale's l_aux is mean_e(me * ce) = sum_e(f_e P_e) / E, the native top1 loss is
E * sum_e(f_e P_e): they differ by the constant E^2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

fairscale_moe = pytest.importorskip("fairscale.nn.moe")
import fairscale.nn.moe.top2gate as top2gate  # noqa: E402

from moepipe.config import ConfigError, ModelConfig, MoEConfig  # noqa: E402
from moepipe.model.fairscale_moe import FIXED, FairscaleMoE, ensure_process_group  # noqa: E402
from moepipe.model.moe import MoELayer  # noqa: E402
from moepipe.model.router import router_z_loss  # noqa: E402
from moepipe.model.transformer import build_model, lm_loss  # noqa: E402

from conftest import compose_cfg  # noqa: E402
from dist_utils import gather_state, run_distributed, save  # noqa: E402

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


def _zeros(shape, device):
    return torch.zeros(shape, device=device)


@pytest.fixture
def no_gumbel(monkeypatch):
    monkeypatch.setattr(top2gate, "gumbel_rsample", _zeros)


def compat_cfg(num_experts: int, **kw) -> MoEConfig:
    base = dict(
        num_experts=num_experts, top_k=2, expert_hidden=24, capacity_factor=1.0, aux_loss_type="top1",
        normalize_after_drop=True, score_func="softmax", normalize_weights=True, drop_policy="position",
        aux_loss_coef=0.0, z_loss_coef=0.0,
    )
    base.update(kw)
    return MoEConfig(**base)


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
    stats = native.stats.host()
    assert stats.kept.tolist() == fs_kept.tolist()
    assert stats.calls == 1
    if skew > 0:
        assert stats.asked - int(stats.kept.sum()) > 0, "this case must exercise capacity drops"

    # aux loss: native top1 = E^2 * fairscale l_aux
    assert stats.aux_loss_sum == pytest.approx(num_experts**2 * float(fs.l_aux.detach()), rel=1e-5)


def test_gumbel_noise_is_patched(process_group, no_gumbel):
    logits = torch.randn(8, 4)
    a = top2gate.top2gating(logits)[1]
    b = top2gate.top2gating(logits)[1]
    torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ the backend layer itself

# Each row switches on what the backend honours beyond fairscale's own gate.
LAYER_CASES = {
    "plain": dict(),
    "aux_and_z": dict(aux_loss_coef=0.1, z_loss_coef=0.05),
    "shared": dict(num_shared_experts=2, shared_expert_hidden=8, aux_loss_coef=0.1),
    "skew": dict(aux_loss_coef=0.1, z_loss_coef=0.01),
    "jitter": dict(router_jitter=0.2, z_loss_coef=0.01),
}


def _pair_of_layers(case: str, num_experts: int = 4):
    cfg = compat_cfg(num_experts, **LAYER_CASES[case])
    torch.manual_seed(3)
    fs = FairscaleMoE(D, cfg)
    for p in fs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    native = MoELayer(D, cfg)
    native.load_state_dict(fs.state_dict(), strict=True)  # same names as the native layer
    if case == "skew":
        offset = torch.tensor([2.0] + [0.0] * (num_experts - 1))
        fs.set_routing_skew(offset)
        native.set_routing_skew(offset)
    return fs, native


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_backend_layer_equals_native_layer(process_group, no_gumbel, case):
    """With the noise off, FairscaleMoE is the native layer in fairscale.yaml's semantics: same
    output, gradients (aux and z-loss included), and routing statistics."""
    fs, native = _pair_of_layers(case)
    x = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(5))
    g = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(6))
    results = []
    for layer in (fs, native):
        layer.train()
        layer.aux_loss_scale = 0.5
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(11)  # the jitter draws the same noise in both
        out = layer(xi)
        (out * g).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results.append((out.detach(), xi.grad.clone(), grads, layer.stats.host()))
    (out_f, gx_f, grads_f, st_f), (out_n, gx_n, grads_n, st_n) = results
    torch.testing.assert_close(out_f, out_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_f, gx_n, rtol=1e-4, atol=1e-6)
    assert grads_f.keys() == grads_n.keys() and "router.weight" in grads_f
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_n[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert st_f.demand.tolist() == st_n.demand.tolist()
    assert st_f.kept.tolist() == st_n.kept.tolist()
    assert st_f.asked == st_n.asked == 2 * 32 and st_f.calls == 1
    assert st_f.aux_loss_sum == pytest.approx(st_n.aux_loss_sum, rel=1e-5)
    assert st_f.z_loss_sum == pytest.approx(st_n.z_loss_sum, rel=1e-5)
    if case == "shared":
        assert any(n.startswith("shared.") for n in grads_f)
    if case == "skew":
        assert st_f.demand[0] > st_f.kept[0] == 2 * 32 // 4, "the skew must overfill expert 0 past its capacity"


def test_demand_counts_the_gumbel_choices_before_capacity(process_group, monkeypatch):
    """With fairscale's noise on, demand is its pre-capacity choices: the noiseless first choice
    plus the noisy second one, 2 per token, of which the capacity keeps at most 2T/E per expert."""
    noise = torch.distributions.Gumbel(0.0, 1.0).sample((32, 4))
    monkeypatch.setattr(top2gate, "gumbel_rsample", lambda shape, device: noise.clone())
    torch.manual_seed(0)
    fs = FairscaleMoE(D, compat_cfg(4))
    with torch.no_grad():
        fs.router.weight.normal_(0, 1.0)
    fs.set_routing_skew(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(1))
    fs(x)
    st = fs.stats.host()
    logits = fs.router.logits(x)
    first = logits.argmax(1)
    second = (logits + noise).scatter(1, first[:, None], float("-inf")).argmax(1)
    assert (second != first).all()
    assert st.demand.tolist() == (torch.bincount(first, minlength=4) + torch.bincount(second, minlength=4)).tolist()
    assert int(st.demand.sum()) == st.asked == 64
    assert (st.kept <= torch.minimum(st.demand, torch.tensor(16))).all()
    assert int(st.demand[0]) > 16 == int(st.kept[0]), "the skew must overfill expert 0"


def test_z_loss_coef_changes_the_gate_gradient(process_group, no_gumbel):
    """z_loss_coef is honoured: with a zero main loss only the attached aux losses reach the
    gate; adding the z-loss adds exactly coef * d z/d W_gate."""
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(2))
    grads, z_reported = {}, {}
    for coef in (0.0, 0.5):
        torch.manual_seed(0)
        fs = FairscaleMoE(D, compat_cfg(4, aux_loss_coef=0.1, z_loss_coef=coef))
        fs.train()
        (fs(x) * 0).sum().backward()
        grads[coef] = fs.router.weight.grad.clone()
        z_reported[coef] = fs.stats.host().z_loss_sum
        w = fs.router.weight.detach().clone().requires_grad_(True)
        router_z_loss(x @ w.t()).backward()
        dz = w.grad
    assert not torch.allclose(grads[0.0], grads[0.5])
    torch.testing.assert_close(grads[0.5] - grads[0.0], 0.5 * dz, rtol=1e-4, atol=1e-7)
    assert z_reported[0.5] == pytest.approx(float(router_z_loss(x @ fs.router.weight.detach().t())), rel=1e-6)


def test_forward_and_backward_make_no_host_synchronisation(process_group):
    from test_host_sync import SyncGuard

    torch.manual_seed(0)
    fs = FairscaleMoE(D, compat_cfg(4, aux_loss_coef=0.1, z_loss_coef=0.01, num_shared_experts=1))
    fs.train()
    fs.set_routing_skew(torch.linspace(0, 1, 4))
    xs = [torch.randn(2, 8, D, requires_grad=True) for _ in range(3)]
    (fs(xs[0]) ** 2).sum().backward()  # warm-up: fairscale builds its Gumbel sampler on first use
    with SyncGuard() as guard:
        for x in xs[1:]:
            (fs(x) ** 2).sum().backward()
    assert guard.total == 0, guard.report()  # static einsum shapes: not even the split-size read


def test_fairscale_backend_in_model_trains(process_group):
    mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=48, max_seq_len=16)
    ecfg = compat_cfg(4, backend="fairscale", aux_loss_coef=0.1)
    torch.manual_seed(0)
    model = build_model(mcfg, ecfg)
    assert sum(1 for _ in model.moe_layers()) == 2
    assert all(isinstance(m, FairscaleMoE) for _, m in model.moe_layers())
    names = {n for n, _ in model.named_parameters()}
    assert "layers.0.ffn.router.weight" in names and "layers.1.ffn.experts.3.w2.weight" in names
    assert all(".experts." in n for n in names if ".w1." in n and ".ffn." in n)
    model.train()
    tokens = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    assert torch.isfinite(loss)
    loss.backward()
    for lid, moe in model.moe_layers():
        gate_grad = moe.router.weight.grad
        assert gate_grad is not None and torch.isfinite(gate_grad).all() and float(gate_grad.abs().max()) > 0
        expert_grads = [p.grad for p in moe.experts.parameters() if p.grad is not None]
        assert expert_grads and all(torch.isfinite(gr).all() for gr in expert_grads)
        st = moe.stats.host()
        assert st.calls == 1 and st.asked == 4 * 8 * 2
        assert 0 < int(st.kept.sum()) <= 4 * 8 * 2
        assert int(st.kept.max()) <= 2 * 32 // 4  # fairscale's capacity 2T/E


def test_fairscale_aux_loss_reaches_gate(process_group):
    """The backend attaches aux_loss_coef * l_aux: with a zero main loss the gate still gets a gradient."""
    ecfg = compat_cfg(4, backend="fairscale", aux_loss_coef=1.0)
    torch.manual_seed(0)
    moe = FairscaleMoE(D, ecfg)
    moe.train()
    x = torch.randn(8, D)
    out = moe(x)
    (out * 0).sum().backward()
    grad = moe.router.weight.grad
    assert grad is not None and float(grad.abs().max()) > 0


def test_fairscale_backend_batch_not_divisible_by_experts(process_group, no_gumbel):
    """B=2 sequences with E=4 experts: fairscale only needs the token count (2*8) to divide by E.
    The model's loss equals the native model's with the same weights (names are shared)."""
    mcfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_hidden=48, max_seq_len=16)
    ecfg = compat_cfg(4, backend="fairscale")
    fs_model, native_model = build_model(mcfg, ecfg), build_model(mcfg, compat_cfg(4))
    native_model.load_state_dict(fs_model.state_dict(), strict=True)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = [lm_loss(m(tokens[:, :-1]), tokens[:, 1:]) for m in (fs_model, native_model)]
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)


# ------------------------------------------------------------------ configuration

BAD_VALUES = {
    "top_k": 1, "score_func": "sigmoid", "capacity_factor": 1.25, "drop_policy": "score", "normalize_weights": False,
    "normalize_after_drop": False, "aux_loss_type": "switch", "bias_update_rate": 0.01,
}


def test_fairscale_preset_states_the_native_semantics():
    cfg = compose_cfg(["moe=fairscale"])
    assert {f: getattr(cfg.moe, f) for f in FIXED} == FIXED
    assert cfg.moe.backend == "fairscale"


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_option_fairscale_cannot_honour_is_a_config_error(field):
    assert set(BAD_VALUES) == set(FIXED)
    value = BAD_VALUES[field]
    with pytest.raises(ConfigError, match=rf"^moe\.{field}={value} .*: set moe\.{field}=") as err:
        compose_cfg(["moe=fairscale", f"moe.{field}={value}"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,match", [
    (["parallel=pp2_ep2"], r"^parallel\.ep=2 is not supported by moe\.backend=fairscale .*use moe\.backend=native"),
    (["parallel.ep=2"], r"^parallel\.ep=2 "),
    (["model.d_model=32", "moe.num_experts=6", "train.batch_size=4", "train.seq_len=8"], r"^moe\.num_experts=6 does not divide the 8 tokens"),
    (["parallel=pp2_dp2", "schedule.microbatches=2", "train.batch_size=8", "train.seq_len=6"], r"^moe\.num_experts=8 does not divide the 12 tokens"),
])
def test_layouts_fairscale_cannot_run_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_cfg(["moe=fairscale", *overrides], single_process=not any(o.startswith("parallel") for o in overrides))


@pytest.mark.parametrize("overrides", [
    ["parallel=pp2"], ["parallel=pp2_dp2"], ["parallel=pp2", "placer=balance_by_time"],
    ["moe.z_loss_coef=0.01", "moe.num_shared_experts=1", "moe.router_jitter=0.1", "workload.kind=zipf"],
])
def test_what_fairscale_honours_validates(overrides):
    cfg = compose_cfg(["moe=fairscale", *overrides], single_process=not any(o.startswith("parallel") for o in overrides))
    assert cfg.moe.backend == "fairscale"


# ------------------------------------------------------------------ training

SMALL = ["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=2", "moe.expert_hidden=32",
         "moe.num_experts=4", "train.batch_size=4", "train.seq_len=16", "train.eval_batches=1", "data.max_bytes=300000",
         "logger.progress=plain"]


@pytest.mark.timeout(200)
def test_cli_trains_single_process_with_fairscale(tmp_path):
    """The issue's command (test-sized), with an injected skew and the honoured options on: it
    used to stop at step 0 on the routing-skew hook."""
    proc = subprocess.run(
        [sys.executable, "-m", "moepipe.train", "parallel=single", "moe=fairscale", "train.steps=3", *SMALL,
         "train.log_every=1", "train.eval_every=3", "workload.kind=zipf", "moe.z_loss_coef=0.01", "moe.num_shared_experts=1",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["config"]["moe"]["backend"] == "fairscale"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    for r in rows:
        if "loss" in r:
            assert r["z_loss"] > 0 and 0 <= r["dropped_frac"] < 1 and r["load_balance_max"] >= 1


def test_cli_rejects_ep_with_fairscale_before_starting(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moepipe.train", "parallel=pp2_ep2", "moe=fairscale", *SMALL, "train.batch_size=8",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "parallel.ep=2" in line]
    assert len(lines) == 1 and "moe.backend=native" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


STEPS = 3
DIST = [
    "moe=fairscale", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=4", "model.max_seq_len=16",
    "moe.expert_hidden=32", "moe.num_experts=4", "moe.aux_loss_coef=0.01", "moe.z_loss_coef=0.01", "moe.num_shared_experts=1",
    "train.batch_size=8", "train.seq_len=16", f"train.steps={STEPS}", "train.dtype=fp32", "train.eval_batches=1",
    "data.max_bytes=300000", "optim.warmup_steps=2", "optim.lr=3e-3", "optim.grad_clip=0.05", "schedule.name=1f1b",
    "placer=static", "workload.kind=zipf", "workload.strength=0.1",
]


def _dist_cfg(pp: int, dp: int, microbatches: int):
    return compose_cfg(DIST + [f"parallel.pp={pp}", "parallel.ep=1", f"parallel.dp={dp}", f"schedule.microbatches={microbatches}"])


def _zero_gumbel() -> None:
    top2gate.gumbel_rsample = _zeros


def _stage_plans():
    from moepipe.placement.plan import Plan

    experts = {layer: [[0]] * 4 for layer in range(4)}
    return [Plan(stage_layers=split, stage_to_pp_rank=[0, 1], expert_map=experts, pp=2, ep=1, dp=1)
            for split in ([(0, 1), (1, 4)], [(0, 3), (3, 4)])]


def _dist_worker(rank: int, world: int, pp: int, dp: int, moving: bool, out_dir: str) -> None:
    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer

    _zero_gumbel()
    mesh = build_mesh(pp, 1, dp)
    trainer = DistributedTrainer(_dist_cfg(pp, dp, 2), mesh)
    groups = [moe.moe.group for m in trainer.modules.values() for _, moe in m.moe_layers()]
    assert groups and all(dist.get_world_size(g) == 1 and g is not dist.group.WORLD for g in groups)
    plans, losses, moved, loads = _stage_plans(), [], [], []
    for step in range(STEPS):
        result = trainer.train_step(step)
        losses.append(result.loss)
        loads.append({lid: v.tolist() for lid, v in result.expert_load.items()})
        if moving and step < 2:  # layers 1..2 go to pp rank 1, then layers 1..2 come back and layer 2 joins rank 0
            moved.append(trainer.migrate(plans[step])["bytes_moved"])
    losses.append(trainer.evaluate())
    state = gather_state(list(trainer.modules.values()), rank)
    if rank == 0:
        save({"losses": losses, "state": state, "moved": moved, "loads": loads}, os.path.join(out_dir, f"pp{pp}_dp{dp}_{int(moving)}.pt"))


def _reference(microbatches: int, monkeypatch):
    """The single-process run of the same config. Its evaluation splits each validation batch
    into the token groups the distributed evaluation forwards (one per pipeline and
    microbatch): fairscale's capacity, 2T/E, is per group, so the grouping changes the drops."""
    from moepipe.train.loop import Trainer

    monkeypatch.setattr(top2gate, "gumbel_rsample", _zeros)
    trainer = Trainer(_dist_cfg(1, 1, microbatches))
    results = [trainer.train_step(s) for s in range(STEPS)]
    assert all(r.routing["dropped_frac"] > 0 for r in results), "the capacity must drop tokens here"
    trainer.model.eval()
    with torch.no_grad():
        val = [float(lm_loss(trainer.model(xc), yc)) for x, y in trainer.val_set for xc, yc in zip(x.chunk(microbatches), y.chunk(microbatches))]
    losses = [r.loss for r in results] + [sum(val) / len(val)]
    loads = [{lid: v.tolist() for lid, v in r.expert_load.items()} for r in results]
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, loads


def _assert_matches(got: dict, ref_losses, ref_state, ref_loads, label: str) -> None:
    assert got["loads"] == ref_loads, f"{label}: per-expert demand (all-reduced statistics) differs"
    # tolerances as in test_parallel_parity: pipelines only reorder floating-point sums
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0, msg=lambda m: f"{label}: {m}")
    assert set(got["state"]) == set(ref_state), f"{label}: parameter names differ"
    for name, ref in ref_state.items():
        rel = float((got["state"][name] - ref).norm() / ref.norm())
        assert rel <= 1e-5, f"{label}: {name} differs by {rel:.2e} relative"


@pytest.mark.timeout(300)
def test_pp2_and_layer_migration_match_single_process(process_group, monkeypatch, tmp_path):
    """pp2 (1F1B, 2 microbatches) gives the single-process losses and weights; so does the same
    run with whole layers live-migrated between the pipeline ranks after steps 0 and 1."""
    ref = _reference(2, monkeypatch)
    for moving in (False, True):
        run_distributed(_dist_worker, 2, 2, 1, moving, str(tmp_path), timeout=240)
        got = torch.load(tmp_path / f"pp2_dp1_{int(moving)}.pt", weights_only=False)
        _assert_matches(got, *ref, f"pp2 moving={moving}")
        assert (len(got["moved"]) == 2 and all(b > 0 for b in got["moved"])) if moving else got["moved"] == []


@pytest.mark.timeout(300)
def test_pp2_dp2_matches_single_process(process_group, monkeypatch, tmp_path):
    """pp2 x dp2 with 2 microbatches per pipeline sees the single-process run's 4 microbatches:
    dense and expert gradients are averaged over the replicas, so losses and weights agree."""
    ref = _reference(4, monkeypatch)
    run_distributed(_dist_worker, 4, 2, 2, False, str(tmp_path), timeout=280)
    _assert_matches(torch.load(tmp_path / "pp2_dp2_0.pt", weights_only=False), *ref, "pp2 x dp2")
