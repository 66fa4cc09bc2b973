"""Lean weight gradients (parallel/weight_grad.py) and the simulator's memory model of them.

Single process: a tiny model run as a zero-bubble stage does (every microbatch's I, a full
backward with the Linear weights detached, then the Ws) ends with gradients bit-for-bit equal
to plain autograd's, and what it keeps between I and W is exactly the bytes the model spec
predicts (each Linear's input and output gradient). The simulator's peak under
weight_grad="lean" equals an independent walk over the schedule's actions.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moepipe.config import ConfigError
from moepipe.model.transformer import build_model, lm_loss
from moepipe.parallel.weight_grad import LeanWeightGrad
from moepipe.placement.model_spec import build_model_spec

from conftest import compose_cfg

TINY = ["model.d_model=16", "model.n_heads=2", "model.ffn_hidden=32", "model.n_layers=2", "model.max_seq_len=8",
        "moe.num_experts=4", "moe.expert_hidden=24", "moe.top_k=2", "moe.capacity_factor=0", "moe.aux_loss_coef=0.01",
        "moe.z_loss_coef=0.01", "train.batch_size=4", "train.seq_len=8", "train.dtype=fp32"]


def _data(cfg, m: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (m, 2, 8), generator=g)
    return x, torch.roll(x, -1, dims=-1)


def test_lean_w_gradients_equal_autograd_and_keep_the_predicted_bytes():
    torch.manual_seed(0)
    cfg = compose_cfg(TINY)
    m = 2
    x, y = _data(cfg, m)
    ref, ours = build_model(cfg.model, cfg.moe, 0), build_model(cfg.model, cfg.moe, 0)
    for mb in range(m):
        (lm_loss(ref(x[mb]), y[mb]) / m).backward()

    lean = LeanWeightGrad(ours)
    assert len(lean.linears) > 0
    kept: dict[int, int] = {}  # storage -> bytes, as a memory probe counts them
    lean.pack = lambda t: kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t
    lean.active = True
    runners = []
    for mb in range(m):  # F0 F1 I0 I1 W0 W1
        lean.mb = mb
        out = ours(x[mb])
        lean.mb = None
        (lm_loss(out, y[mb]) / m).backward()
        runners.append(lean.runner(mb))
        if mb == 0:
            # between I and W: exactly what the spec says lean W keeps (dropless routing:
            # T * top_k routed tokens per MoE layer)
            spec = build_model_spec(cfg.model, cfg.moe, cfg.train, microbatches=1, dtype_bytes=4)
            T = x[0].numel()
            want = T * spec.head_lean_w_elems + sum(
                T * l.lean_w_elems + T * cfg.moe.top_k * l.expert_lean_w_elems for l in spec.layers)
            assert sum(kept.values()) == 4 * want
        kept.clear()
    linear_weights = {id(l.weight) for l in lean.linears}
    for name, p in ours.named_parameters():  # I formed every other gradient already
        assert (p.grad is None) == (id(p) in linear_weights), name
    for run in runners:
        run()
    lean.active = False
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), f"{name}: {(p.grad - q.grad).abs().max()}"
    # outside an active step the patched Linears compute as usual
    ours.zero_grad()
    lm_loss(ours(x[0]), y[0]).backward()
    assert ours.output.weight.grad is not None and ours.layers["0"].attn.wq.weight.grad is not None
    assert not lean.records
    twin = copy.deepcopy(ours.output)  # a copy computes with its own weight
    with torch.no_grad():
        twin.weight.mul_(2)
    h = torch.randn(3, cfg.model.d_model)
    assert torch.equal(twin(h), torch.nn.functional.linear(h, twin.weight))


def _walk_peak(order, s2r, act, lean, pp) -> np.ndarray:
    """Per pipeline rank, the most bytes held after a forward: microbatches between F and I/B
    hold act[s], between I and W lean[s] (a direct walk over each rank's actions)."""
    peak = np.zeros(pp)
    for r, acts in order.items():
        full, past = {}, {}
        for a in acts:
            for x in a.leaves():
                s = x.stage
                if x.kind == "F":
                    full[s] = full.get(s, 0) + 1
                    peak[r] = max(peak[r], sum(full[t] * act[t] + past.get(t, 0) * lean[t] for t in full))
                elif x.kind == "B":
                    full[s] -= 1
                elif x.kind == "I":
                    full[s] -= 1
                    past[s] = past.get(s, 0) + 1
                elif x.kind == "W":
                    past[s] -= 1
    return peak


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("zbv", 2), ("interleaved_zb", 2)])
def test_simulated_memory_follows_the_runtime(schedule, v):
    from moepipe.config import moe_layer_ids
    from moepipe.placement.cost_model import CostModel, stage_costs
    from moepipe.placement.plan import static_plan
    from moepipe.placement.topology import free_topology
    from moepipe.sim import simulate
    from moepipe.sim.schedules import plan_style, schedule_order
    from moepipe.sim.simulator import weight_grad_mode

    pp, m = 2, 8
    cfg = compose_cfg(TINY + ["model.n_layers=4", "train.batch_size=16"])
    spec = build_model_spec(cfg.model, cfg.moe, cfg.train, microbatches=m, dtype_bytes=4)
    cm = CostModel(spec)
    plan = static_plan(4, moe_layer_ids(cfg.model, cfg.moe), 4, pp=pp, ep=1, virtual_stages=v, style=plan_style(schedule))
    topo = free_topology(pp)
    graph, lean = (simulate(plan, schedule, m, topo, cm, free_comm=True, weight_grad=w).peak_activation_bytes for w in ("graph", "lean"))
    costs = stage_costs(cm, plan, topo, free_comm=True)
    act, kept = costs.act_bytes.reshape(-1), costs.lean_w_bytes.reshape(-1)
    assert (kept < act).all() and (kept > 0).all()
    order, s2r = schedule_order(schedule, pp, v, m)
    assert np.allclose(lean, _walk_peak(order, s2r, act, kept, pp))
    assert np.allclose(graph, _walk_peak(order, s2r, act, act, pp))  # torch's runtime: the graph until W
    if schedule == "1f1b":
        assert np.array_equal(graph, lean)  # no split backwards
    assert weight_grad_mode("moepipe", True) == "lean"
    assert weight_grad_mode("torch", True) == weight_grad_mode("moepipe", False) == weight_grad_mode("moepipe", True, True) == "graph"
    with pytest.raises(ConfigError, match="weight_grad"):
        simulate(plan, schedule, m, topo, cm, free_comm=True, weight_grad="both")


def test_lean_weight_grad_must_be_a_bool():
    from moepipe.config import validate

    cfg = compose_cfg(["parallel=pp2", "schedule=zbv", "schedule.executor=moepipe"], single_process=False)
    cfg.schedule.lean_weight_grad = "yes"  # a programmatic config: Hydra's own type check is bypassed
    with pytest.raises(ConfigError, match="schedule.lean_weight_grad='yes' must be true or false"):
        validate(cfg)


class _Gated(torch.nn.Module):
    """b runs only when asked (an expert without tokens in a microbatch); c's output never
    reaches the loss (its output gradient never arrives)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x, use_b: bool):
        h = torch.tanh(self.a(x))
        self.c(h)
        return (h + self.b(h) if use_b else h).pow(2).sum()


def test_lean_w_skips_linears_that_did_not_run_or_reach_the_loss():
    torch.manual_seed(0)
    ref, ours = _Gated(), _Gated()
    ours.load_state_dict(ref.state_dict())
    xs = torch.randn(2, 3, 4)
    for mb, use_b in enumerate((False, True)):
        ref(xs[mb], use_b).backward()
    lean = LeanWeightGrad(ours)
    lean.active, runners = True, []
    for mb, use_b in enumerate((False, True)):
        lean.mb = mb
        loss = ours(xs[mb], use_b)
        lean.mb = None
        loss.backward()
        runners.append(lean.runner(mb))
    for run in runners:
        run()
    assert ours.c.weight.grad is None and ref.c.weight.grad is None
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
