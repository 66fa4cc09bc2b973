"""A one-process run advises: with placer.advise_mesh it plans for that mesh from its own
routing statistics and says what it would do there; nothing moves."""
import json

import pytest
import torch

from moepipe.config import ConfigError
from moepipe.placement.plan import from_json, validate_plan
from moepipe.placement.replan import default_plan
from moepipe.train.cli import placement_lines

from conftest import compose_cfg

SMALL = ["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=4", "moe.num_experts=4",
         "moe.expert_hidden=32", "train.batch_size=4", "train.seq_len=16", "train.eval_every=0", "train.eval_batches=1",
         "train.log_every=2", "data.max_bytes=100000", "logger.progress=none", "topology=local_cpu"]


def run(tmp_path, overrides):
    from moepipe.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(compose_cfg(SMALL + overrides), str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if r.get("event") == "replan"]


def test_advice_for_another_mesh_moves_hot_experts_and_follows_itself(tmp_path, capsys):
    summary, replans = run(tmp_path, ["train.steps=6", "moe.expert_hidden=256", "placer=topo", "placer.interval=2", "placer.replica_slots=1",
                                      "placer.advise_mesh=[2,2,1]", "workload.kind=hot_expert", "workload.strength=4"])
    assert [r["step"] for r in replans] == [2, 4] and all(r["advisory"] for r in replans)
    first = replans[0]
    # one hot expert on a 2-rank EP group: the static blocks are unbalanced, a new layout pays
    assert first["migrate"] and first["predicted_new_s"] < first["predicted_old_s"] and first["advised_replicas"] >= 0
    assert first["time_scale"] == 1.0  # judged in model units: one device's step time is not the mesh's
    place = summary["placement"]
    assert place["mode"] == "advisory" and place["advise_mesh"] == [2, 2, 1] and place["would_migrate"] >= 1
    assert place["events"][0]["advised_stage_layers"] == first["advised_stage_layers"]
    # the second re-plan starts from the first's advice: its "old" time is the advised layout's
    assert replans[1]["predicted_old_s"] == pytest.approx(first["predicted_new_s"], rel=0.5)
    assert "plans for placer.advise_mesh=[2,2,1]" in capsys.readouterr().err
    lines = placement_lines(place)
    assert lines[0] == f"  placer topo (advisory, for pp2 x ep2 x dp1): 2 re-plan(s), would migrate {place['would_migrate']} time(s)"
    assert lines[1].startswith(f"    step 2: would migrate, layers {first['advised_stage_layers']}, {first['advised_replicas']} replica(s)")


def test_the_advised_plan_is_a_valid_plan_for_that_mesh(tmp_path):
    from moepipe.config import advisory_config, validate
    from moepipe.train.loop import Trainer

    cfg = validate(compose_cfg(SMALL + ["train.steps=5", "moe.expert_hidden=256", "placer=topo", "placer.interval=2", "placer.replica_slots=1",
                                        "placer.advise_mesh=[2,2,1]", "workload.kind=hot_expert", "workload.strength=4"]))
    trainer = Trainer(cfg)
    for step in range(2):
        trainer.train_step(step)
    (event,) = trainer.after_step(2)
    target = advisory_config(cfg)
    assert (target.parallel.pp, target.parallel.ep, target.parallel.dp) == (2, 2, 1)
    assert default_plan(target).pp == 2
    plan = trainer._layout
    validate_plan(plan, cfg.model.n_layers, sorted(plan.expert_map), cfg.moe.num_experts)
    assert (plan.pp, plan.ep) == (2, 2) and event["advised_stage_layers"] == [list(b) for b in plan.stage_layers]


@pytest.mark.parametrize("overrides, match", [
    (["placer.advise_mesh=[2,2]"], "must be three positive integers"),
    (["placer.advise_mesh=[2,0,1]"], "must be three positive integers"),
    (["placer.advise_mesh=[8,1,1]"], r"does not fit this job \(parallel.pp\*schedule.virtual_stages=8 > model.n_layers=4"),
    (["placer.advise_mesh=[1,4,8]", "train.batch_size=32"], "needs 32 devices but topology=local_cpu has 16"),
])
def test_bad_advise_mesh_is_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose_cfg(SMALL + ["placer=topo"] + overrides)


def test_advise_mesh_is_for_one_process():
    with pytest.raises(ConfigError, match=r"is for one-process runs \(parallel.pp\*ep\*dp=4 re-plans its own mesh\)"):
        compose_cfg(SMALL + ["parallel=pp2_ep2", "train.batch_size=16", "placer=topo", "placer.advise_mesh=[2,2,1]"])
