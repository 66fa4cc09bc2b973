"""The fast path at run time (placer.shadow_slots): per-step shadow copies of hot experts
(decided at the start of a step from the last step's counts, weights sent once, gradients
returned once after the last backward) change where expert work runs, not what the step computes.

Each layout runs the same job twice in one set of workers, without shadows and with
placer.shadow_slots=1, under a strong hot-expert skew and declared fast links (so the
decision's rule, compute saved > weight broadcast + gradient return, says yes), and checks:
shadows ran; losses and final parameters agree to the runtime's parity tolerance; the homes'
AdamW moments agree. Not bitwise: a shadowed expert's weight gradient is the home's matmul over
its tokens plus the shadow's over the rest, summed in .grad, where the run without shadows
does one matmul over all of them (another order of fp32 sums, ~1e-7 relative in a gradient
entry); AdamW's exp_avg is linear in the gradient (same tolerance as the gradient), while
g/sqrt(v) amplifies differences of entries near zero in the parameters (as in
test_parallel_parity). exp_avg_sq is compared relative to its tensor norm.

The first step has no counts yet, so no shadows; STEPS = 3 gives two shadowed steps (two
microbatches each, so the shadows' gradients accumulate over microbatches, and under activation
checkpointing over the recomputed forwards too) and AdamW moments built on them.

ep2 x dp2 also starts from a plan with a replicated expert (its home is the first holder; the
shadow's gradient goes there, then the replica sync sums the copies) and migrates homes live
after the first step, with shadows on: the next step decides on the new plan's holders.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moepipe.model.shadow_exchange import shadow_digest
from moepipe.parallel.mesh import build_mesh
from moepipe.placement.plan import Plan, from_json, to_json
from moepipe.train.distributed import DistributedTrainer

from conftest import compose_cfg
from dist_utils import gather_state, run_distributed, save

STEPS = 3
BASE = [
    "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=4", "model.max_seq_len=16",
    "moe.expert_hidden=32", "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=0",
    "moe.aux_loss_coef=0", "moe.z_loss_coef=0.01", "train.batch_size=16", "train.seq_len=16",
    f"train.steps={STEPS}", "train.dtype=fp32", "data.max_bytes=300000", "optim.warmup_steps=1", "optim.lr=3e-3",
    "optim.grad_clip=0.05", "schedule.name=1f1b", "schedule.microbatches=2",
    # one expert per layer takes most tokens; declared cheap links make shadows pay on paper
    "workload.kind=hot_expert", "workload.strength=8",
    "topology.intra_node_latency_us=0", "topology.intra_node_bw_gbps=1000",
]


def cfg_for(pp: int, ep: int, dp: int, slots: int, extra: tuple = ()):
    return compose_cfg(BASE + list(extra) + [f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.dp={dp}", f"placer.shadow_slots={slots}"])


def optimizer_state(trainer, rank: int) -> dict | None:
    """exp_avg / exp_avg_sq / step of every parameter by global name, merged on rank 0 (copies
    must agree bit for bit, as in gather_state)."""
    local = {}
    for m in trainer.modules.values():
        for name, p in m.named_parameters():
            st = trainer.optimizer.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in st:
                    local[f"{name}.{k}"] = torch.as_tensor(st[k]).detach().clone()
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    if rank != 0:
        return None
    merged = {}
    for part in parts:
        for k, t in part.items():
            assert k not in merged or torch.equal(merged[k], t), f"copies of {k} diverged"
            merged[k] = t
    return merged


# (name, shadow slots, extra overrides) run one after the other in the same workers
RUNS = ((0, 0, ()), (1, 1, ()))
CHECKPOINTED = ("ckpt", 1, ("train.activation_checkpointing=true",))  # recomputed forwards run the shadows again


def _worker(rank: int, world: int, layout: tuple, plan_json: str | None, migrate_json: str | None, out_dir: str, runs: tuple = RUNS) -> None:
    pp, ep, dp = layout
    mesh = build_mesh(pp, ep, dp)
    out = {}
    for key, slots, extra in runs:
        trainer = DistributedTrainer(cfg_for(pp, ep, dp, slots, extra), mesh, from_json(plan_json) if plan_json else None)
        losses = []
        for s in range(STEPS):
            if migrate_json and s == 1:
                trainer.migrate(from_json(migrate_json))
            losses.append(trainer.train_step(s).loss)
        used = torch.tensor([sum(u["copies"] for u in trainer.shadow_usage().values())], dtype=torch.float64)
        dist.all_reduce(used)
        out[key] = {"losses": losses, "state": gather_state(list(trainer.modules.values()), rank),
                      "optim": optimizer_state(trainer, rank), "shadows": float(used)}
    # the agreement check before any exchange: equal sets pass; sets that differ on one EP rank
    # fail on every rank of the group (so all of them skip the exchange alike)
    same = {0: {1: (1,)}}
    differ = {0: {1: (mesh.ep_rank,)}}
    agree = torch.tensor([float(trainer._shadows_agree(same)), float(trainer._shadows_agree(differ))])
    gathered = [torch.zeros(2) for _ in range(world)]
    dist.all_gather(gathered, agree)
    out["agree"] = [g.tolist() for g in gathered]
    if rank == 0:
        save(out, os.path.join(out_dir, "run.pt"))


def check(run: dict, key=1) -> None:
    off, on = run[0], run[key]
    assert off["shadows"] == 0
    assert on["shadows"] > 0, "the skew should have made the decision place shadows"
    torch.testing.assert_close(torch.tensor(on["losses"]), torch.tensor(off["losses"]), rtol=1e-5, atol=0)
    assert set(on["state"]) == set(off["state"])
    for name, ref in off["state"].items():
        got = on["state"][name]
        assert float((got - ref).norm() / ref.norm()) <= 1e-5, name
        assert not ((got - ref).abs() > 1e-5 + 1e-5 * ref.abs()).any(), name
    assert set(on["optim"]) == set(off["optim"])
    for key, ref in off["optim"].items():
        got = on["optim"][key]
        if key.endswith(".step"):
            assert torch.equal(got, ref), key
            continue
        rel = float((got - ref).norm() / ref.norm()) if ref.norm() > 0 else float(got.norm())
        assert rel <= 1e-5, f"{key}: {rel:.2e} relative"


def _replica_plan(ep: int, n_layers: int, E: int, swap: bool) -> Plan:
    """Static blocks of E/ep experts per rank, expert 1 replicated on both ranks; `swap` moves the
    homes of experts 0 and E-1 (a live migration of homes)."""
    per = E // ep
    m = [[e // per] for e in range(E)]
    m[1] = [0, 1]
    if swap:
        m[0], m[E - 1] = [ep - 1], [0]
    return Plan(stage_layers=[(0, n_layers)], stage_to_pp_rank=[0], expert_map={l: m for l in range(n_layers)}, pp=1, ep=ep, dp=2)


@pytest.mark.timeout(300)
def test_shadows_keep_parity_pp2_ep2(tmp_path):
    run_distributed(_worker, 4, (2, 2, 1), None, None, str(tmp_path), RUNS + (CHECKPOINTED,), timeout=280)
    run = torch.load(tmp_path / "run.pt")
    check(run)
    check(run, "ckpt")  # with activation checkpointing: same numbers as the plain run without shadows
    assert run["agree"] == [[1.0, 0.0]] * 4


@pytest.mark.timeout(300)
def test_shadows_keep_parity_ep2_dp2_with_replica_and_migration(tmp_path):
    start, moved = to_json(_replica_plan(2, 4, 8, False)), to_json(_replica_plan(2, 4, 8, True))
    run_distributed(_worker, 4, (1, 2, 2), start, moved, str(tmp_path), timeout=280)
    check(torch.load(tmp_path / "run.pt"))


@pytest.mark.parametrize("overrides, match", [
    (["parallel.ep=1", "placer.shadow_slots=1"], "needs expert parallelism"),
    (["parallel.ep=2", "placer.shadow_slots=-1"], "must be >= 0"),
    (["parallel.ep=2", "placer.shadow_slots=1", "schedule.name=pipedream_2bw", "schedule.executor=moepipe"], "pipedream_2bw"),
    (["parallel.ep=2", "placer.shadow_slots=1", "schedule.name=zbv", "schedule.virtual_stages=2"], "split into input and weight"),
    (["parallel.ep=2", "parallel.tp=2", "placer.shadow_slots=1"], "parallel.tp=2"),
])
def test_bad_shadow_config_is_one_line(overrides, match):
    from moepipe.config import ConfigError

    with pytest.raises(ConfigError, match=match) as err:
        compose_cfg(BASE[:-4] + ["parallel.pp=1", "parallel.dp=1"] + overrides)
    assert "\n" not in str(err.value) and "placer.shadow_slots" in str(err.value)


def test_fairscale_backend_is_refused():
    from moepipe.config import ConfigError

    with pytest.raises(ConfigError, match="moe.backend=native"):
        compose_cfg(BASE[:-4] + ["parallel.pp=1", "parallel.ep=2", "parallel.dp=1", "placer.shadow_slots=1", "moe.backend=fairscale"])


def test_shadow_digest_is_order_free_and_tells_sets_apart():
    a = {0: {3: (1, 2), 5: (0,)}, 2: {}}
    b = {2: {}, 0: {5: [0], 3: [2, 1]}}
    assert shadow_digest(a) == shadow_digest(b) == shadow_digest({0: {3: (1, 2), 5: (0,)}, 2: {7: ()}})
    assert shadow_digest(a) != shadow_digest({0: {3: (1,), 5: (0,)}})
    assert shadow_digest(a) != shadow_digest({1: {3: (1, 2), 5: (0,)}})
    assert 0 <= shadow_digest(a) < 2 ** 62


def test_exchange_plan_every_rank_agrees():
    from moepipe.model.shadow_exchange import exchange_plan, home_of

    holders = [[0], [1, 2], [2], [0]]
    # two layers' shadows in one exchange; expert 1's home is its first holder, rank 1
    shadows = {(0, 0): (1, 2), (0, 1): (0,), (0, 3): (2,), (1, 2): (0, 1)}
    homes = {k: home_of(holders, k[1]) for k in shadows}
    plans = [exchange_plan(shadows, homes, r, 3) for r in range(3)]
    # what rank s sends to d is what d receives from s, in the same order
    def blocks(items, splits):
        starts = [sum(splits[:i]) for i in range(len(splits))]
        return [items[a : a + n] for a, n in zip(starts, splits)]

    for s in range(3):
        for d in range(3):
            assert blocks(plans[s][0], plans[s][1])[d] == blocks(plans[d][2], plans[d][3])[s]
    assert plans[0][0] == [(0, 0), (0, 0), (0, 3)] and plans[0][1] == [0, 1, 2]
    assert plans[2][2] == [(0, 0), (0, 3)] and plans[2][3] == [2, 0, 0]
    assert plans[2][0] == [(1, 2), (1, 2)] and plans[2][1] == [1, 1, 0]
