"""measure_profile: the profile JSON the calibrated cost model accepts, measured in one process."""
import json

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from moepipe.config import moe_layer_ids
from moepipe.model import build_model
from moepipe.placement.cost_model import CostModel, load_profile
from moepipe.placement.model_spec import build_model_spec
from moepipe.placement.plan import static_plan
from moepipe.placement.topology import from_config
from moepipe.sim import simulate
from moepipe.train.profile import measure_profile, profile_for, step_overhead_s, write_profile

SMALL = ["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "moe.expert_hidden=32", "train.batch_size=8", "train.seq_len=16",
         "data.max_bytes=200000", "train.dtype=fp32", "train.device=cpu", "moe.every=2", "schedule.microbatches=2"]  # blocks 1, 3 MoE


def cfg_for(schedule="1f1b", extra=()):
    v = 1 if schedule in ("gpipe", "1f1b") else 2
    return compose_cfg(SMALL + ["parallel=pp2", f"schedule={schedule}", f"schedule.virtual_stages={v}", *extra])


@pytest.fixture(scope="module")
def prof():
    return measure_profile(cfg_for(), repeats=3, warmup=1)


def phases(d):
    return d["fwd_s"], d["bwd_input_s"], d["bwd_weight_s"]


def test_keys_shapes_and_positive_times(prof):
    cfg = cfg_for()
    moe = moe_layer_ids(cfg.model, cfg.moe)
    assert moe == [1, 3]
    assert prof["version"] == 1 and prof["device"]["tflops"] > 0
    b = cfg.train.batch_size // cfg.schedule.microbatches
    assert prof["tokens_per_microbatch"] == b * cfg.train.seq_len
    assert prof["meta"]["threads"] >= 1 and prof["meta"]["microbatch_sequences"] == b
    assert sorted(int(k) for k in prof["layers"]) == list(range(cfg.model.n_layers))
    assert sorted(int(k) for k in prof["expert_per_token_s"]) == moe
    # An MoE block's non-expert part is the block minus its experts, clamped at 0 when timing
    # noise on a busy core makes the difference negative: each phase >= 0, every part's total > 0.
    for entry in [*prof["layers"].values(), *prof["expert_per_token_s"].values(), prof["head"], prof["embedding"]]:
        f, bi, bw = phases(entry)
        assert min(f, bi, bw) >= 0 and f > 0 and bi + bw > 0, entry
    for d in prof["backward_detail"]["expert_per_token_s"].values():
        assert min(d.values()) > 0
    so = prof["step_overhead"]
    assert all(t > 0 for t in so["layers"].values()) and so["embedding_s"] > 0 and so["head_s"] > 0
    json.dumps(prof)  # plain JSON


def test_routing_counts_sum_to_tokens_times_k(prof):
    cfg = cfg_for()
    assert prof["routing_tokens"] == cfg.train.batch_size * cfg.train.seq_len  # the rank's whole first batch (ep = dp = 1)
    for layer in moe_layer_ids(cfg.model, cfg.moe):
        counts = prof["routing"][str(layer)]
        assert len(counts) == cfg.moe.num_experts and min(counts) >= 0
        assert sum(counts) == prof["routing_tokens"] * cfg.moe.top_k


def test_cost_model_from_profile_simulates_and_keeps_the_measured_times(prof, tmp_path):
    cfg = cfg_for()
    path = tmp_path / "profile.json"
    write_profile(path, prof)
    spec = build_model_spec(cfg.model, cfg.moe, cfg.train, cfg.schedule.microbatches, cfg.parallel.dp, dtype_bytes=4)
    cm = CostModel(spec, profile=str(path))  # the file, as sim.profile would pass it
    plan = static_plan(cfg.model.n_layers, moe_layer_ids(cfg.model, cfg.moe), cfg.moe.num_experts, 2, 1, 1, "loop", 1)
    topo = from_config({"name": "t", "nodes": 1, "devices_per_node": 2,
                        "device_groups": [{"count": 2, "name": "cpu", "tflops": prof["device"]["tflops"]}]}, 2)
    routing = {int(k): v for k, v in prof["routing"].items()}
    res = simulate(plan, "1f1b", cfg.schedule.microbatches, topo, cm, routing)
    assert res.iteration_time_s > 0 and np.isfinite(res.iteration_time_s)
    # Device throughput equal to the measuring device's: a stage's forward is the sum of its measured parts.
    T = prof["tokens_per_microbatch"]
    per_mb = prof["routing_tokens"] / T
    want = prof["embedding"]["fwd_s"]
    for layer in range(*plan.stage_layers[0]):
        want += prof["layers"][str(layer)]["fwd_s"]
        if str(layer) in prof["expert_per_token_s"]:
            want += prof["expert_per_token_s"][str(layer)]["fwd_s"] * sum(prof["routing"][str(layer)]) / per_mb
    assert res.costs.comp[0, 0] == pytest.approx(want, rel=1e-6)
    assert load_profile(json.loads(path.read_text())).tokens_per_microbatch == T
    assert step_overhead_s(prof, plan) > 0


def test_backward_split_follows_the_schedule(prof):
    det = prof["backward_detail"]
    # fused schedules: B + W = the fused backward torch runs for them
    for k, d in prof["layers"].items():
        assert d["bwd_input_s"] + d["bwd_weight_s"] == pytest.approx(det["layers"][k]["bwd_fused_s"])
    zb = profile_for(prof, cfg_for("interleaved_zb"))
    assert zb["meta"]["backward"] == "split" and zb["meta"]["first_stage_layers"] == [0]
    # torch: the first stage's I is empty and its W runs the whole backward
    assert phases(zb["layers"]["0"])[1:] == (0.0, det["layers"]["0"]["bwd_fused_s"])
    assert phases(zb["embedding"])[1:] == (0.0, det["embedding"]["bwd_fused_s"])
    assert phases(zb["layers"]["2"])[1:] == (det["layers"]["2"]["bwd_input_s"], det["layers"]["2"]["bwd_weight_s"])
    zbv = profile_for(prof, cfg_for("zbv"))
    assert zbv["meta"]["first_stage_layers"] == [0]


def test_model_passed_in_is_left_unchanged():
    cfg = cfg_for()
    model = build_model(cfg.model, cfg.moe, cfg.train.seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    threads = torch.get_num_threads()
    p = measure_profile(cfg, model=model, threads=1, repeats=1, warmup=0, step_overhead=False)
    assert "step_overhead" not in p and p["meta"]["threads"] == 1
    assert torch.get_num_threads() == threads
    for n, q in model.named_parameters():
        assert torch.equal(q, before[n]) and q.grad is None, n
    assert all(m.stats.calls == 0 for _, m in model.moe_layers())  # counters as they were (fresh model: empty)


def test_dense_model():
    cfg = cfg_for(extra=["moe=dense"])
    p = measure_profile(cfg, repeats=1, warmup=0, step_overhead=False)
    assert p["routing"] == {} and p["expert_per_token_s"] == {}
    spec = build_model_spec(cfg.model, cfg.moe, cfg.train, cfg.schedule.microbatches, 1, dtype_bytes=4)
    CostModel(spec, profile=p)


def test_statistic_mean_and_bad_statistic():
    cfg = cfg_for()
    p = measure_profile(cfg, repeats=2, warmup=0, step_overhead=False, statistic="mean")
    assert "mean" in p["meta"]["timer"]
    assert all(v > 0 for v in phases(p["layers"]["1"])[:1])
    with pytest.raises(ValueError, match="statistic"):
        measure_profile(cfg, repeats=1, warmup=0, step_overhead=False, statistic="mode")


def _null_worker(rank, world, names, out):
    import torch.distributed as dist

    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.profile import measure_schedule_overhead

    mesh = build_mesh(2, 1, 1)
    res = {}
    for n in names:
        cpu = []
        res[n] = measure_schedule_overhead(cfg_for(n, ["schedule.microbatches=4"]), mesh.pp_group, steps=2, warmup=1, threads=1, cpu=cpu)
        assert len(cpu) == 2 and all(c >= 0 for c in cpu)
    g = [None] * world
    dist.all_gather_object(g, res)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(g, f)


def test_measure_schedule_overhead_runs_every_schedule_kind(tmp_path):
    from dist_utils import run_distributed

    names = ["1f1b", "interleaved_zb", "dualpipev"]
    out = str(tmp_path / "null.json")
    run_distributed(_null_worker, 2, names, out, timeout=300)
    with open(out) as f:
        g = json.load(f)
    for n in names:
        assert all(len(r[n]) == 2 and all(t > 0 for t in r[n]) for r in g)
