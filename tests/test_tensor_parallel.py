"""Tensor parallelism (parallel.tp) matches the single-process reference: 5 AdamW steps, fp32,
losses (and the distributed evaluation) to rtol 1e-5, every parameter (TP shards gathered with
DTensor.full_tensor) within test_parallel_parity's bounds.

Layouts with one data slice (tp2, pp2 x tp2) run with the Switch balancing loss on: every TP
rank routes all tokens and seeds 1/tp of the aux loss's gradient, which the TP group sums, so
a doubled or missing share shows. Layouts with EP split the batch into slices, whose balancing
loss legitimately differs from the whole batch's (see test_parallel_parity), so they run it off.
With sequence parallelism (parallel.sp) each TP rank routes its own sequence shard and seeds its
shard's share of the balancing loss (expert counts summed over TP), and the norms' gradients
are summed over TP: the same reference, the same bounds. Every run's routing statistics (per
layer demand each step; the balancing and z losses with one data slice) equal the reference's.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moepipe.config import ConfigError
from moepipe.parallel.mesh import build_mesh
from moepipe.train.distributed import DistributedTrainer
from moepipe.train.loop import Trainer
from moepipe.train.optim import delayed_update

from conftest import compose_cfg
from dist_utils import gather_state, run_distributed, save
from test_parallel_parity import BASE, STEPS, assert_matches

AUX_ON = ("moe.aux_loss_coef=0.01",)
SP = ("parallel.sp=true",)
# one dense block (first_dense=1) so the dense SwiGLU is split too; shared experts in the MoE blocks
TP_MODEL = ("placer=static", "moe.first_dense=1", "moe.num_shared_experts=1", "moe.shared_expert_hidden=32")


# run by moepipe's executor only (a preset sets it), one stage per rank
MOEPIPE_ONLY = ("chimera", "pipedream_2bw")


def cfg_for(schedule: str, pp: int, ep: int, tp: int, extra: tuple = (), dp: int = 1):
    v = 1 if schedule in ("gpipe", "1f1b") + MOEPIPE_ONLY else 2
    preset = [f"schedule={schedule}"] if schedule in MOEPIPE_ONLY else []
    return compose_cfg(BASE + list(TP_MODEL) + preset + [
        f"schedule.name={schedule}", f"schedule.virtual_stages={v}", "schedule.microbatches=4",
        f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.dp={dp}", f"parallel.tp={tp}"] + list(extra))


def reference(schedule: str, extra: tuple) -> tuple[list[float], dict[str, torch.Tensor], list]:
    trainer = Trainer(cfg_for(schedule, 1, 1, 1, extra))
    steps = [trainer.train_step(s) for s in range(STEPS)]
    losses = [r.loss for r in steps] + [trainer.evaluate()]
    return losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, routing_of(steps)


def routing_of(steps: list) -> list:
    """Each step's routing record: per-layer expert demand and the routing metrics."""
    return [({lid: torch.as_tensor(load) for lid, load in r.expert_load.items()}, dict(r.routing)) for r in steps]


def _worker(rank: int, world: int, runs: list, out_dir: str) -> None:
    """runs: [(pp, ep, tp[, dp]), schedule, extra overrides], each layout of `world` ranks."""
    from torch.distributed.tensor import DTensor

    meshes = {}
    for i, (layout, schedule, extra) in enumerate(runs):
        pp, ep, tp, dp = layout + (1,) * (4 - len(layout))
        if layout not in meshes:
            meshes[layout] = build_mesh(pp, ep, dp, tp=tp)
        cfg = cfg_for(schedule, pp, ep, tp, extra, dp=dp)
        trainer = DistributedTrainer(cfg, meshes[layout])
        wq = [p for m in trainer.modules.values() for n, p in m.named_parameters() if n.endswith("attn.wq.weight")]
        assert wq and all(isinstance(p, DTensor) and p.to_local().shape[0] * tp == p.shape[0] for p in wq), "attention is not TP-split"
        # positions each activation holds: norm inputs, a later stage's received input (the
        # pipeline's message); seq_len/tp under sequence parallelism. The head's logits: every
        # position, V/tp columns (split by vocabulary)
        held, logits = set(), set()
        for stage, module in trainer.modules.items():
            watched = [b.attn_norm for b in module.layers.values()] + [b.ffn_norm for b in module.layers.values()]
            watched += [module] if stage > 0 else []
            watched += [module.norm] if module.norm is not None else []
            for m in watched:
                m.register_forward_pre_hook(lambda _, args: held.add(args[0].shape[1]))
            if module.output is not None:
                module.output.register_forward_hook(lambda _, args, out: logits.add(tuple(out.shape[1:])))
        steps = [trainer.train_step(s) for s in range(STEPS)]
        losses = [r.loss for r in steps]
        assert held == {cfg.train.seq_len // (tp if cfg.parallel.sp else 1)}, (held, extra)
        assert logits == {(cfg.train.seq_len, cfg.model.vocab_size // tp)} or not trainer.holds_last, (logits, extra)
        losses.append(trainer.evaluate())
        state = gather_state(list(trainer.modules.values()), rank)
        if rank == 0:
            save({"losses": losses, "state": state, "routing": routing_of(steps)}, os.path.join(out_dir, f"run{i}.pt"))


_REFERENCES: dict = {}


def reference_for(schedule: str, extra: tuple):
    """The one-process run (computed once per module, on one thread like the workers; shared
    by the runs with and without sequence parallelism, which the reference lacks)."""
    extra = tuple(o for o in extra if o not in SP)
    # the one-process trainer reads the schedule only for pipedream_2bw's delayed rule
    # (WeightStash, checked against an independent implementation in tests/test_2bw.py); every
    # flushing schedule (chimera's two replicas too) only orders the same sums: one reference
    schedule = schedule if delayed_update(schedule) else "1f1b"
    if (schedule, extra) not in _REFERENCES:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _REFERENCES[(schedule, extra)] = reference(schedule, extra)
        finally:
            torch.set_num_threads(threads)
    return _REFERENCES[(schedule, extra)]


def check_runs(runs: list, world: int, tmp_path) -> None:
    run_distributed(_worker, world, runs, str(tmp_path), timeout=360)
    for i, (layout, schedule, extra) in enumerate(runs):
        got, (losses, state, routing) = torch.load(tmp_path / f"run{i}.pt"), reference_for(schedule, extra)
        label = f"(pp, ep, tp[, dp])={layout} {schedule} {extra}"
        assert_matches(got, losses, state, label=label)
        # routing statistics count each token once (what the metrics, expert bias and placer
        # read): every step's per-layer demand equals the reference's; the balancing and z
        # losses too where the run has one data slice (EP slices route their own batches)
        for (load, metrics), (ref_load, ref_metrics) in zip(got["routing"], routing, strict=True):
            assert load.keys() == ref_load.keys() and all(torch.equal(load[k], ref_load[k]) for k in load), label
            if layout[1] == 1 and layout[3:] in ((), (1,)):
                for key in ("aux_loss", "z_loss", "load_balance_mean", "dropped_frac"):
                    assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-12), (label, key)


# TP under the schedules with their own gradient/weight handling, and TP with DP: tp2 x pp2
# under pipedream_2bw (both weight versions hold TP shards), under chimera (the mirrored
# replicas sum their gradients' shards, per TP index), and dp2 x tp2 (data slices over TP groups)
# (the fewest microbatches that fill pp2 and give chimera's replicas one each; one without a
# pipeline: the suite's budget)
M2, M1 = ("schedule.microbatches=2",), ("schedule.microbatches=1",)
SCHEDULE_RUNS = [((2, 1, 2), "pipedream_2bw", AUX_ON + M2), ((2, 1, 2), "chimera", AUX_ON + M2), ((1, 1, 2, 2), "1f1b", M1)]


@pytest.mark.timeout(400)
def test_pp2_tp2_and_ep2_tp2_match_reference(tmp_path):
    """tp2 x pp2 (balancing loss on) and tp2 x ep2 (tokens split over TP, then dispatched
    through each TP index's EP group); then with sequence parallelism (activations, pipeline
    messages and MoE routing on seq_len/tp positions; each shard's tokens through its own TP
    index's EP group): tp2 x pp2 under two schedules; then SCHEDULE_RUNS (pipedream_2bw,
    chimera, dp2 x tp2). One 4-process job (TP under gpipe runs with SP only, SP with EP in
    the 8-rank job: the suite's budget)."""
    runs = [((2, 1, 2), "1f1b", AUX_ON), ((1, 2, 2), "1f1b", ())]
    sp_runs = [((2, 1, 2), "1f1b", AUX_ON + SP), ((2, 1, 2), "gpipe", AUX_ON + SP)]
    check_runs(runs + sp_runs + SCHEDULE_RUNS, 4, tmp_path)


@pytest.mark.timeout(400)
def test_pp2_ep2_tp2_matches_reference(tmp_path):
    """The 4D-minus-DP mesh on 8 ranks: tp2 x pp2 x ep2 under interleaved 1F1B (two virtual
    stages per rank), then with sequence parallelism under 1F1B (each TP index's sequence shard
    through its own EP group, across a pipeline boundary)."""
    check_runs([((2, 2, 2), "interleaved_1f1b", ()), ((2, 2, 2), "1f1b", SP)], 8, tmp_path)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_token_chunks_dispatch_every_assignment_once(capacity_factor):
    """The TP token split is exact: dispatching each chunk's assignments (token_chunk) and
    stacking the chunks gives the whole batch's result, with and without dropped assignments."""
    from torch import nn

    from moepipe.model.layers import SwiGLU
    from moepipe.model.moe import local_dispatch
    from moepipe.model.router import route
    from moepipe.parallel.tensor_parallel import token_chunk

    torch.manual_seed(0)
    T, d, E, tp = 24, 8, 4, 3
    x = torch.randn(T, d)
    experts = nn.ModuleDict({str(e): SwiGLU(d, 16) for e in range(E)})
    routing = route(torch.randn(T, E), 2, capacity_factor=capacity_factor)
    whole = local_dispatch(x, routing, experts)
    rows = T // tp
    parts = [local_dispatch(x[i * rows : (i + 1) * rows], token_chunk(routing, i * rows, (i + 1) * rows, E), experts) for i in range(tp)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)
    kept = sum(int(token_chunk(routing, i * rows, (i + 1) * rows, E).kept_counts.sum()) for i in range(tp))
    assert kept == int(routing.kept_counts.sum())


@pytest.mark.parametrize("aux_loss_type", ["switch", "top1"])
def test_sequence_shards_share_the_balancing_losses(aux_loss_type):
    """Routed in tp sequence shards, the shards' balancing and z losses sum to the whole
    microbatch's, and so do their gradients w.r.t. the logits; the counts each shard hands to
    the TP sum (stood in for here by the whole batch's) add up to the whole batch's."""
    from moepipe.model.router import count_per_expert, route

    torch.manual_seed(0)
    T, E, k, tp = 24, 8, 2, 3
    logits = torch.randn(T, E, requires_grad=True)
    whole = route(logits, k, aux_loss_type=aux_loss_type)
    (whole.aux_loss + whole.z_loss).backward()
    ref_grad, logits.grad = logits.grad, None
    choices = logits.detach().topk(k, dim=-1).indices
    total = count_per_expert((choices[:, :1] if aux_loss_type == "top1" else choices).reshape(-1), E)
    handed = []

    def sum_over_shards(counts: torch.Tensor) -> torch.Tensor:
        handed.append(counts.clone())
        return total

    rows = T // tp
    shards = [route(logits[i * rows : (i + 1) * rows], k, aux_loss_type=aux_loss_type, token_shards=tp, sum_shards=sum_over_shards)
              for i in range(tp)]
    assert len(handed) == tp and torch.equal(sum(handed), total)
    torch.testing.assert_close(sum(s.aux_loss for s in shards), whole.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(sum(s.z_loss for s in shards), whole.z_loss, rtol=1e-6, atol=0)
    sum(s.aux_loss + s.z_loss for s in shards).backward()
    torch.testing.assert_close(logits.grad, ref_grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(sum(s.demand_counts for s in shards), whole.demand_counts)
    with pytest.raises(ValueError, match="capacity-limited routing over sequence shards"):
        route(logits[:rows], k, capacity_factor=1.0, token_shards=tp, sum_shards=sum_over_shards)


def test_shard_rule_and_local_layout():
    from moepipe.parallel.migration import EntrySpec
    from moepipe.parallel.tensor_parallel import local_layout, shard_dim

    split = {"layers.0.attn.wq.weight": 0, "layers.0.attn.wk.weight": 0, "layers.0.attn.wv.weight": 0, "layers.0.attn.wo.weight": 1,
             "layers.0.ffn.w1.weight": 0, "layers.0.ffn.w3.weight": 0, "layers.0.ffn.w2.weight": 1,
             "layers.1.ffn.shared.w1.weight": 0, "layers.1.ffn.shared.w2.weight": 1}
    split["tok_embeddings.weight"] = split["output.weight"] = 0  # by vocabulary
    replicated = ["norm.weight", "layers.0.attn_norm.weight", "layers.1.ffn.router.weight",
                  "layers.1.ffn.router.expert_bias", "layers.1.ffn.experts.3.w1.weight", "layers.1.ffn.experts.3.w2.weight"]
    assert {n: shard_dim(n) for n in split} == split and all(shard_dim(n) is None for n in replicated)
    layout = local_layout({"layers.0.attn.wo.weight": EntrySpec((8, 6), True), "layers.0.ffn.w1.weight": EntrySpec((6, 8), True),
                           "layers.1.ffn.experts.3.w1.weight": EntrySpec((6, 8), True)}, 2)
    assert [spec.shape for spec in layout.values()] == [(8, 3), (3, 8), (6, 8)]


@pytest.mark.parametrize("overrides,needle", [
    (("parallel.tp=3",), "model.n_heads=2 is not divisible by parallel.tp=3"),
    (("model.n_heads=4", "model.n_kv_heads=1", "parallel.tp=2"), "model.n_kv_heads=1 is not divisible by parallel.tp=2"),
    (("parallel.tp=2", "model.ffn_hidden=63"), "model.ffn_hidden=63 is not divisible by parallel.tp=2"),
    (("parallel.tp=2", "moe.backend=fairscale"), "only the native MoE layer"),
    (("parallel.tp=2", "model.vocab_size=255"), "model.vocab_size=255 is not divisible by parallel.tp=2"),
    (("parallel.tp=2", "model.tie_embeddings=true"), "model.tie_embeddings=true with parallel.tp=2"),
    (("parallel.tp=2", "parallel.sp=true", "train.seq_len=15"), "train.seq_len=15 is not divisible by parallel.tp=2"),
    (("parallel.tp=2", "parallel.sp=true", "moe.capacity_factor=1.25"), "moe.capacity_factor=1.25 with parallel.sp=true"),
    (("parallel.tp=2", "parallel.sp=true", "moe.router_jitter=0.01"), "moe.router_jitter=0.01 with parallel.sp=true"),
    (("parallel.sp=true",), "parallel.sp=true needs tensor parallelism"),
    (("parallel.tp=2", "parallel.ep=2", "parallel.a2a=hierarchical"), "parallel.tp=2 with parallel.a2a=hierarchical"),
    (("parallel.tp=2", "topology.devices_per_node=3", "topology.nodes=2"), "parallel.tp=2 does not fit in a node of topology.devices_per_node=3"),
])
def test_bad_tp_config_is_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        cfg_for("1f1b", 1, 1, 1, overrides)
    text = str(err.value)
    assert needle in text and "\n" not in text, text


HALF = 2


def _ckpt_worker(rank: int, world: int, single_root: str, root: str, out: str) -> None:
    from moepipe.train import checkpoint as ck

    cfg_tp, cfg_pp = cfg_for("1f1b", 1, 1, 2), cfg_for("1f1b", 2, 1, 1)
    mesh_tp, mesh_pp = build_mesh(1, 1, 1, tp=2), build_mesh(2, 1, 1)
    first = DistributedTrainer(cfg_tp, mesh_tp)
    results = {"saved": [first.train_step(s).loss for s in range(HALF)]}
    path = ck.save_checkpoint(first, cfg_tp, root, HALF, {"model": {}, "moe": {}})
    results["weights"] = gather_state(list(first.modules.values()), rank)
    from_single = ck.latest_checkpoint(single_root)
    for label, cfg, mesh, source in (("tp2_to_tp2", cfg_tp, mesh_tp, path), ("tp2_to_pp2", cfg_pp, mesh_pp, path),
                                     ("tp1_to_tp2", cfg_tp, mesh_tp, from_single)):
        trainer = DistributedTrainer(cfg, mesh)
        assert ck.load_checkpoint(trainer, ck.ResumePoint(source, ck.read_manifest(source)), cfg) == HALF
        results[label] = [trainer.train_step(s).loss for s in range(HALF, 2 * HALF)]
    if rank == 0:
        save(results, os.path.join(out, "ckpt.pt"))


@pytest.mark.timeout(400)
def test_checkpoints_reshard_across_tp(tmp_path):
    """tp2 alone matches the reference (losses and weights after HALF steps); save under tp2,
    resume under tp2, pp2 and one process; save in one process, resume under tp2."""
    from moepipe.train import checkpoint as ck

    single_root, root = str(tmp_path / "single"), str(tmp_path / "tp2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the reference: one process, 2 x HALF steps, saving after HALF (saving changes nothing)
        ref = Trainer(cfg_for("1f1b", 1, 1, 1))
        ref_losses = [ref.train_step(s).loss for s in range(HALF)]
        ref_half = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
        ck.save_checkpoint(ref, cfg_for("1f1b", 1, 1, 1), single_root, HALF, {"model": {}, "moe": {}})
        ref_losses += [ref.train_step(s).loss for s in range(HALF, 2 * HALF)]
    finally:
        torch.set_num_threads(threads)
    run_distributed(_ckpt_worker, 2, single_root, root, str(tmp_path), timeout=360)
    got = torch.load(tmp_path / "ckpt.pt")
    torch.set_num_threads(1)
    try:
        single = Trainer(cfg_for("1f1b", 1, 1, 1))
        path = ck.latest_checkpoint(root)
        assert ck.read_manifest(path)["mesh"] == {"pp": 1, "ep": 1, "dp": 1, "tp": 2}
        assert ck.load_checkpoint(single, ck.ResumePoint(path, ck.read_manifest(path)), cfg_for("1f1b", 1, 1, 1)) == HALF
        for name, p in single.model.named_parameters():  # the TP shards load bit-exact into whole weights
            assert torch.equal(p.detach(), got["weights"][name]), name
        got["tp2_to_tp1"] = [single.train_step(s).loss for s in range(HALF, 2 * HALF)]
    finally:
        torch.set_num_threads(threads)
    close = dict(rtol=1e-5, atol=0)
    # the tp2 run itself (aux loss off here) against the reference, as in the parity tests
    assert_matches({"losses": got["saved"], "state": got["weights"]}, ref_losses[:HALF], ref_half, "tp2 (saved run)")
    for label in ("tp2_to_tp2", "tp2_to_pp2", "tp1_to_tp2", "tp2_to_tp1"):
        torch.testing.assert_close(torch.tensor(got[label]), torch.tensor(ref_losses[HALF:]), **close, msg=label)


def _migration_worker(rank: int, world: int, out_dir: str) -> None:
    """pp2 x tp2: the same run still and with two re-placements of its blocks (dense and MoE,
    TP-sharded) between the pipeline ranks, shard to shard."""
    import hashlib

    from moepipe.placement.plan import Plan
    from test_migration import BASE as MIG_BASE, STEPS as MIG_STEPS

    mesh = build_mesh(2, 1, 1, tp=2)
    cfg = compose_cfg(MIG_BASE + ["parallel.pp=2", "parallel.ep=1", "parallel.dp=1", "parallel.tp=2", "placer=static",
                                  "moe.first_dense=1", "moe.num_shared_experts=1", "moe.shared_expert_hidden=32"])
    moe_ids = list(range(1, 6))
    plans = [Plan(stage_layers=split, stage_to_pp_rank=[0, 1], expert_map={l: [[0]] * 4 for l in moe_ids}, pp=2, ep=1, dp=1)
             for split in ([(0, 4), (4, 6)], [(0, 2), (2, 6)])]

    def digests(trainer) -> dict[tuple[str, int], set[str]]:
        local = {}
        for name, ts in trainer._entries().items():
            h = hashlib.sha1()
            for t in ts:
                h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
            local[(name, mesh.tp_rank)] = h.hexdigest()
        everything = [None] * dist.get_world_size()
        dist.all_gather_object(everything, local)
        out: dict = {}
        for part in everything:
            for key, d in part.items():
                out.setdefault(key, set()).add(d)
        return out

    results = {}
    for moving in (False, True):
        trainer = DistributedTrainer(cfg, mesh)
        todo, losses, checks = list(plans), [], []
        for step in range(MIG_STEPS):
            losses.append(trainer.train_step(step).loss)
            if moving and step in (1, 3):
                before = digests(trainer)
                event = trainer.migrate(todo.pop(0))
                checks.append((before, digests(trainer), event["bytes_moved"], trainer.plan.stage_layers))
        losses.append(trainer.evaluate())
        results[moving] = {"losses": losses, "state": gather_state(list(trainer.modules.values()), rank), "checks": checks}
    if rank == 0:
        save(results, os.path.join(out_dir, "migration.pt"))


@pytest.mark.timeout(400)
def test_migration_under_tp_moves_shards_and_preserves_state(tmp_path):
    run_distributed(_migration_worker, 4, str(tmp_path), timeout=360)
    res = torch.load(tmp_path / "migration.pt", weights_only=False)
    still, moved = res[False], res[True]
    torch.testing.assert_close(torch.tensor(moved["losses"]), torch.tensor(still["losses"]), rtol=1e-5, atol=0)
    for name, ref in still["state"].items():
        assert (moved["state"][name] - ref).norm() <= 1e-5 * ref.norm() + 1e-6, name
    assert [c[3] for c in moved["checks"]] == [[(0, 4), (4, 6)], [(0, 2), (2, 6)]]
    for before, after, nbytes, _ in moved["checks"]:
        assert nbytes > 0 and set(before) == set(after)
        for key in before:  # each (entry, TP rank): one copy everywhere, unchanged bit for bit
            assert len(after[key]) == 1 and before[key] == after[key], key
    sharded = [k for k in moved["checks"][0][0] if k[0].endswith("attn.wq.weight")]
    assert {k[1] for k in sharded} == {0, 1} and moved["checks"][0][0][sharded[0]] != moved["checks"][0][0][(sharded[0][0], 1 - sharded[0][1])]


def test_mesh_search_keeps_sequence_parallelism_for_tp_meshes():
    """parallel.sp=true in the searched config applies to the meshes with TP (the cost model's
    activation memory / tp); a tp1 candidate drops it instead of failing validation."""
    from moepipe.config import validate
    from moepipe.placement.mesh_search import with_mesh

    cfg = cfg_for("1f1b", 1, 1, 2, SP)
    assert validate(with_mesh(cfg, 2, 2, 1, 1)).parallel.sp is True
    assert validate(with_mesh(cfg, 1, 2, 1, 1)).parallel.sp is False
