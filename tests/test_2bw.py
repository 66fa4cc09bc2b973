"""PipeDream-2BW (schedule=pipedream_2bw): two weight versions and a one-step gradient delay,
W(t+1) = W(t) - update(grad f_t(W(t-1))), W(-1) = W(0).

The single-process Trainer is the reference of that rule (checked here against an independent
re-implementation: a standard 1F1B trainer whose parameters are set to W(t-1) before the
gradient and to W(t) before the optimizer step). The distributed run (pp2, pp2 x ep2, pp4)
runs without a flush (StreamExecutor: batch t-1's last backwards inside step t, with the
weights their forwards used) and matches it to 1e-5 like the other schedules
(tests/test_parallel_parity.py states why 1e-5 and not bitwise). The simulator's 2BW: the
steady no-flush iteration of the same stream, and two weight versions.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from moepipe.config import ConfigError

from conftest import compose_cfg
from dist_utils import gather_state, run_distributed, save

STEPS = 5
TINY = ["model.d_model=16", "model.n_heads=2", "model.ffn_hidden=32", "model.n_layers=4", "model.max_seq_len=8",
        "moe.num_experts=4", "moe.expert_hidden=16", "moe.top_k=2", "moe.capacity_factor=0", "moe.aux_loss_coef=0",
        "moe.z_loss_coef=0.01", "train.batch_size=8", "train.seq_len=8", f"train.steps={STEPS}", "train.dtype=fp32",
        "data.max_bytes=100000", "optim.warmup_steps=1", "optim.lr=3e-3", "optim.grad_clip=0.05"]


def _cfg(schedule: str, pp: int = 1, ep: int = 1):
    return compose_cfg(TINY + [f"schedule={schedule}", "schedule.microbatches=4", f"parallel.pp={pp}", f"parallel.ep={ep}", "parallel.dp=1"])


def _reference(schedule: str = "pipedream_2bw"):
    from moepipe.train.loop import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(_cfg(schedule))
        losses = [trainer.train_step(s).loss for s in range(STEPS)]
        return trainer, losses
    finally:
        torch.set_num_threads(threads)


def test_the_preset_runs_on_moepipes_executor_and_torch_cannot_run_it():
    cfg = _cfg("pipedream_2bw")
    assert cfg.schedule.executor == "moepipe" and cfg.schedule.name == "pipedream_2bw"
    with pytest.raises(ConfigError, match="set schedule.executor=moepipe"):
        compose_cfg(TINY + ["schedule.name=pipedream_2bw", "schedule.executor=torch"])
    from moepipe.sim.schedules import schedule_program

    with pytest.raises(ConfigError, match="virtual_stages=2 with schedule.name=pipedream_2bw"):
        schedule_program("pipedream_2bw", 2, 2, 4)


@pytest.mark.timeout(60)
def test_reference_applies_the_delayed_rule_exactly():
    from moepipe.train.loop import Trainer

    ours, losses = _reference()
    # Independent re-implementation on a standard trainer: parameters hold W(t-1) while the
    # gradient is computed, W(t) when the optimizer applies it.
    torch.set_num_threads(1)
    plain = Trainer(_cfg("1f1b"))
    params = list(plain.model.parameters())
    w_now = [p.detach().clone() for p in params]  # W(t)
    w_prev = [p.detach().clone() for p in params]  # W(t-1)
    step_fn = plain.optimizer.step

    def delayed_step(*a, **k):
        with torch.no_grad():
            for p, w in zip(params, w_now):
                p.copy_(w)
        out = step_fn(*a, **k)
        for i, p in enumerate(params):
            w_prev[i] = w_now[i]
            w_now[i] = p.detach().clone()
        return out

    plain.optimizer.step = delayed_step
    expected = []
    for s in range(STEPS):
        with torch.no_grad():
            for p, w in zip(params, w_prev):
                p.copy_(w)
        expected.append(plain.train_step(s).loss)
    assert losses == expected
    for (name, p), w in zip(ours.model.named_parameters(), w_now):
        assert torch.equal(p, w), name
    # the delay is real: step 0 is plain AdamW, later steps are not
    _, plain_losses = _reference("1f1b")
    assert losses[0] == plain_losses[0] and losses[2] != plain_losses[2]


def _worker(rank: int, world: int, pp: int, ep: int, out_dir: str, drain_after: int) -> None:
    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer

    trainer = DistributedTrainer(_cfg("pipedream_2bw", pp, ep), build_mesh(pp, ep, 1), None)
    losses = []
    for s in range(STEPS):
        losses.append(trainer.train_step(s).loss)
        if s + 1 == drain_after:  # a mid-run drain (evaluation, checkpoint) must not change the numerics
            trainer.drain_pipeline()
    trainer.drain_pipeline()  # the last batch's backwards and update: parameters are W(STEPS)
    state = gather_state(list(trainer.modules.values()), rank)
    if rank == 0:
        save({"losses": losses, "state": state, "type": type(trainer.schedule).__name__}, os.path.join(out_dir, "2bw.pt"))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("pp,ep,drain_after", [(2, 1, 0), (2, 2, 3), (4, 1, 0)], ids=["pp2", "pp2_ep2_drained_midway", "pp4"])
def test_distributed_2bw_matches_the_delayed_reference(pp, ep, drain_after, tmp_path):
    # no flush: rank r runs the last pp-1-r backwards of batch t-1 inside step t, with W(t-2)
    from test_parallel_parity import assert_matches

    run_distributed(_worker, pp * ep, pp, ep, str(tmp_path), drain_after, timeout=130)
    ref, losses = _reference()
    got = torch.load(tmp_path / "2bw.pt")
    assert got["type"] == "StreamExecutor"
    assert_matches(got, losses, {n: p.detach() for n, p in ref.model.named_parameters()}, label=f"2bw pp{pp} ep{ep}")


def test_simulator_reports_the_steady_no_flush_iteration_and_two_weight_versions():
    from moepipe.sim.simulator import simulate_order
    from moepipe.sim.schedules import schedule_order, steady_iteration

    pp, m, F, B = 4, 8, 1.0, 2.0
    comp = np.tile([F, B, 0.0], (pp, 1))
    order, s2r = schedule_order("pipedream_2bw", pp, 1, m)
    flushed = simulate_order(order, s2r, m, comp).makespan
    assert flushed == pytest.approx((m + pp - 1) * (F + B))  # 1F1B with its flush
    steady = steady_iteration("pipedream_2bw", pp, 1, m, lambda o, s, k: simulate_order(o, s, k, comp).makespan)
    assert steady == pytest.approx(m * (F + B))  # no flush: the bottleneck stage never idles


def test_full_simulation_of_2bw_against_1f1b():
    from moepipe.sim.simulator import simulate
    from test_sim import setup

    prof = {"device": {"tflops": 0.01}, "tokens_per_microbatch": 128,  # every block 1 ms per phase: uniform stages
            "layers": {str(i): {"fwd_s": 1e-3, "bwd_input_s": 1e-3, "bwd_weight_s": 1e-3} for i in range(8)},
            "embedding": {"fwd_s": 0, "bwd_s": 0}, "head": {"fwd_s": 0, "bwd_s": 0},
            "expert_per_token_s": {"fwd_s": 0, "bwd_s": 0}}
    p, m = 4, 8
    plan, topo, cm = setup(pp=p, ep=1, m=m, profile=prof)
    one = simulate(plan, "1f1b", m, topo, cm, free_comm=True)
    two = simulate(plan, "pipedream_2bw", m, topo, cm, free_comm=True)
    assert one.iteration_time_s == pytest.approx((m + p - 1) * 2 * 3e-3) and one.flush and one.weight_versions == 1
    assert two.iteration_time_s == pytest.approx(m * 2 * 3e-3) and not two.flush and two.weight_versions == 2
    assert two.bubble_fraction == pytest.approx(0.0, abs=1e-9) and two.balanced_bound_s == pytest.approx(two.iteration_time_s)
    assert list(two.peak_inflight) == list(one.peak_inflight) == [4, 3, 2, 1]  # 1F1B's activations
    np.testing.assert_allclose(two.weight_bytes, 2 * one.weight_bytes)
    assert one.weight_bytes.min() > 0 and two.summary()["weight_versions"] == 2


def test_the_runtime_stream_is_the_simulated_order_cut_per_step():
    from moepipe.sim.schedules import one_f_one_b_order, two_bw_stream

    pp, m, steps = 4, 5, 3
    phases = two_bw_stream(pp, m)
    for r in range(pp):
        ran, reduced = [], []
        for t, phase in enumerate(["first"] + ["steady"] * (steps - 1) + ["drain"]):
            base = (t - 1) * m if phase != "drain" else (steps - 1) * m  # relative id 0 = the previous batch's first
            for a in phases[phase][r]:
                if a.kind in ("F", "B"):
                    ran.append((a.kind, a.mb + base))
                elif a.kind == "REDUCE_GRAD":  # right after the stage's last backward of a batch
                    reduced.append(ran[-1])
        assert ran == [(a.kind, a.mb) for a in one_f_one_b_order(pp, steps * m)[r]]
        assert reduced == [("B", b * m + m - 1) for b in range(steps)]
