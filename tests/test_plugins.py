"""Plug-ins (moepipe.plugins): names resolve from built-ins, import paths, register() and entry
points; unknown names fail with one line; every built-in and the worked example package pass
the conformance checks; the example runs end to end through moepipe-train and moepipe-sim."""
import importlib.util
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moepipe.config import ConfigError
from moepipe.placement.placers import make_placement
from moepipe.placement.plan import Plan
from moepipe.plugins import KINDS, known, register, resolve, unregister
from moepipe.plugins.builtins import BUILTINS
from moepipe.plugins.conformance import ConformanceError, check, check_placer, check_workload, placer_inputs

from conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
GREEDY = "moepipe_example.placers:greedy"
SPIKE = "moepipe_example.workloads:spike"
BIN = Path(sys.executable).parent
EXAMPLE_INSTALLED = importlib.util.find_spec("moepipe_example") is not None
needs_example = pytest.mark.skipif(not EXAMPLE_INSTALLED, reason="pip install -e examples/moepipe_example (make setup does)")


# ------------------------------------------------------------------ resolution


def test_builtins_resolve_to_their_implementations():
    from moepipe.model import backends
    from moepipe.placement import forecast, workloads
    from moepipe.placement.placers import topo_placer

    assert resolve("placer", "topo") is topo_placer
    assert resolve("workload", "zipf") is workloads.zipf
    assert resolve("forecaster", "ema") is forecast.ema
    assert resolve("moe_backend", "native") is backends.native
    assert resolve("schedule", "zbv").style == "v" and resolve("schedule", "1f1b").multi_stage is False
    for kind in KINDS:
        assert known(kind)[: len(BUILTINS[kind])] == tuple(BUILTINS[kind])


def test_import_path_and_register():
    assert resolve("forecaster", "moepipe.placement.forecast:last")(np.array([np.ones(2), np.full(2, 3.0)]), 1, 0.8).mean.tolist() == [3.0, 3.0]

    @register("workload", "test_first_hot")
    def first_hot(step, layer, num_experts, ep, strength, period, burst_every, seed):
        w = np.ones(num_experts)
        w[0] += strength
        return w / w.sum()

    try:
        assert resolve("workload", "test_first_hot") is first_hot and "test_first_hot" in known("workload")
        assert check_workload("test_first_hot") > 0
        from moepipe.placement.workloads import expert_distribution

        assert np.allclose(expert_distribution("test_first_hot", 0, 0, 4, strength=3.0), [4 / 7, 1 / 7, 1 / 7, 1 / 7])
        cfg = compose_cfg(["workload.kind=test_first_hot"])  # config validation asks the registry too
        assert cfg.workload.kind == "test_first_hot"
    finally:
        unregister("workload", "test_first_hot")
    with pytest.raises(ConfigError, match="workload kind='test_first_hot' is not known"):
        expert_distribution("test_first_hot", 0, 0, 4)


@pytest.mark.parametrize("overrides,start", [
    (["placer.name=magic"], "placer.name='magic' is not known: choose one of static, balance_by_time, eplb, topo"),
    (["placer.forecast=crystal_ball"], "placer.forecast='crystal_ball' is not known: choose one of ema, last"),
    (["workload.kind=tsunami"], "workload.kind='tsunami' is not known: choose one of none, zipf"),
    (["schedule.name=pipedream"], "schedule.name='pipedream' is not known: choose one of gpipe, 1f1b"),
    (["moe.backend=megablocks"], "moe.backend='megablocks' is not known: choose one of native, fairscale, tutel"),
    (["placer.name=no_such_pkg.placers:greedy"], "placer.name='no_such_pkg.placers:greedy' is not known (import failed: "),
])
def test_unknown_name_is_one_line_naming_kind_known_names_and_how_to_add(overrides, start):
    with pytest.raises(ConfigError) as exc:
        compose_cfg(overrides)
    msg = str(exc.value)
    assert msg.startswith(start) and "\n" not in msg, msg
    kind = {"placer.name": "placer", "placer.forecast": "forecaster", "workload.kind": "workload",
            "schedule.name": "schedule", "moe.backend": "moe_backend"}[overrides[0].split("=")[0]]
    assert f"@moepipe.plugins.register('{kind}', name)" in msg and f"entry point in group moepipe.{kind}" in msg


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="plug-in kind='router' is not known"):
        resolve("router", "x")


@needs_example
def test_entry_points_add_short_names():
    import moepipe_example.placers
    import moepipe_example.workloads

    assert "greedy" in known("placer") and "spike" in known("workload")
    assert resolve("placer", "greedy") is moepipe_example.placers.greedy
    assert resolve("workload", "spike") is moepipe_example.workloads.spike
    assert resolve("placer", GREEDY) is moepipe_example.placers.greedy


# ------------------------------------------------------------------ conformance


@pytest.mark.parametrize("kind,name", [(k, n) for k, names in BUILTINS.items() for n in names])
def test_every_builtin_passes_its_conformance_check(kind, name):
    assert check(kind, name) >= 1


@needs_example
def test_example_plugins_pass_conformance():
    assert check_placer(GREEDY) == 8
    assert check_workload(SPIKE) > 0


def _static(inputs, replica_slots, current):
    return resolve("placer", "static")(inputs, replica_slots, current)


def _reversed_stages(inputs, replica_slots, current):
    p = _static(inputs, replica_slots, current)
    return Plan(p.stage_layers, p.stage_to_pp_rank[::-1], p.expert_map, p.pp, p.ep, p.dp)


def _hoarder(inputs, replica_slots, current):  # every expert copied onto every EP rank: over the slot budget
    p = _static(inputs, replica_slots, current)
    everywhere = {l: [list(range(p.ep)) for _ in m] for l, m in p.expert_map.items()}
    return Plan(p.stage_layers, p.stage_to_pp_rank, everywhere, p.pp, p.ep, p.dp)


_calls = []


def _restless(inputs, replica_slots, current):  # a different expert order every call
    _calls.append(1)
    p = _static(inputs, replica_slots, current)
    shift = len(_calls)
    moved = {l: m[shift % len(m):] + m[: shift % len(m)] for l, m in p.expert_map.items()}
    return Plan(p.stage_layers, p.stage_to_pp_rank, moved, p.pp, p.ep, p.dp)


def _drops_a_layer(inputs, replica_slots, current):
    p = _static(inputs, replica_slots, current)
    return Plan(p.stage_layers[:-1] + [(p.stage_layers[-1][0], p.stage_layers[-1][1] - 1)], p.stage_to_pp_rank, p.expert_map, p.pp, p.ep, p.dp)


@pytest.mark.parametrize("bad,why", [
    (_reversed_stages, "fixes"),
    (_hoarder, "more than ceil(E/ep) + replica_slots"),
    (_restless, "must be deterministic"),
    (_drops_a_layer, "the last stage must end at n_layers"),
])
def test_conformance_catches_broken_placers(bad, why):
    with pytest.raises(ConformanceError, match=rf"^{bad.__name__} \[.*{re.escape(why)}"):
        check_placer(bad)


@pytest.mark.parametrize("bad,why", [
    (lambda s, l, E, ep, st, pe, b, sd: np.eye(E)[0], "non-positive"),
    (lambda s, l, E, ep, st, pe, b, sd: np.ones(E), "sum to"),
    (lambda s, l, E, ep, st, pe, b, sd: np.ones(E + 1) / (E + 1), "shape"),
    (lambda s, l, E, ep, st, pe, b, sd: np.random.default_rng().dirichlet(np.ones(E)), "deterministic"),
])
def test_conformance_catches_broken_workloads(bad, why):
    with pytest.raises(ConformanceError, match=why):
        check_workload(bad)


def _writes_its_history(history, horizon, decay):
    history[0] += 1  # e.g. an in-place normalisation
    return history[-1]


def _scenarios_off_the_mean(history, horizon, decay):
    from moepipe.placement.forecast import Forecast

    return Forecast(history[-1], np.stack([history[-1], 2 * history[-1]]), np.array([0.5, 0.5]))


@pytest.mark.parametrize("bad,why", [
    (lambda history, horizon, decay: np.asarray(history[-1]) * 1.1, "must forecast itself"),
    (lambda history, horizon, decay: np.asarray(history[-1])[:1], "forecast mean must be"),
    (lambda history, horizon, decay: history[-1] - history.mean(axis=0), "loads >= 0"),
    (_writes_its_history, "wrote to its history"),
    (_scenarios_off_the_mean, "weighted mean of the scenarios"),
    (lambda history, decay: history[-1], "called as \\(history \\[T, E\\], horizon, decay\\)"),  # the old interface
])
def test_conformance_catches_broken_forecasters(bad, why):
    with pytest.raises(ConformanceError, match=why):
        check("forecaster", bad)


def test_a_placer_function_goes_through_the_same_checks_as_a_name():
    inputs = placer_inputs("pp2-ep2-1f1b-uniform")
    with pytest.raises(ConfigError, match=r"^placer.name=_reversed_stages put stages on pp ranks \[1, 0\]"):
        make_placement(_reversed_stages, inputs)
    assert make_placement(_static, inputs).meta["placer"] == "_static"


# ------------------------------------------------------------------ the example, end to end

TINY = ["model.n_layers=4", "model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.max_seq_len=16",
        "moe.expert_hidden=32", "train.batch_size=8", "train.seq_len=16", "train.eval_batches=1", "data.max_bytes=100000",
        "logger.progress=none", "train.log_every=1", "train.eval_every=0", "train.num_threads=1", "train.dtype=fp32"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("MOEPIPE_")} | {"MPLBACKEND": "Agg"}


@needs_example
@pytest.mark.timeout(240)
def test_example_through_moepipe_train(tmp_path):
    """A 2-process ep2 run re-plans with the example placer under the example workload."""
    proc = subprocess.run(
        [str(BIN / "moepipe-train"), "parallel=ep2", *TINY, "train.steps=4", f"placer.name={GREEDY}", "placer.interval=2",
         f"workload.kind={SPIKE}", "workload.strength=8", "workload.burst_every=2", "parallel.collective_timeout_s=60",
         f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=200, env=ENV, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    replans = [r for r in rows if r.get("event") == "replan"]
    assert [r["step"] for r in replans] == [2], replans  # every 2 steps, not after the last
    event = replans[0]
    assert event["placer"] == GREEDY and not event["reason"].startswith("placer error"), event
    assert event["predicted_old_s"] > 0 and event["predicted_new_s"] > 0
    if event["migrate"]:  # the layout that ran next is greedy's: one copy of each expert, 4 per EP rank
        plan = json.loads(event["plan"])
        assert plan["meta"]["placer"] == GREEDY
        for experts in plan["expert_map"].values():
            assert all(len(ranks) == 1 for ranks in experts) and np.bincount([r[0] for r in experts]).tolist() == [4, 4]
    # the spike workload ran in the workers: on every 2nd step (0-based) expert (layer + step // 2) % 8 is the busiest
    for row in map(json.loads, (tmp_path / "expert_load.jsonl").read_text().splitlines()):
        step = row["step"] - 1
        if step % 2 == 0:
            assert {int(l): int(np.argmax(c)) for l, c in row["tokens_per_expert"].items()} == {l: (l + step // 2) % 8 for l in range(4)}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["placer"]["name"] == GREEDY and summary["config"]["workload"]["kind"] == SPIKE


@needs_example
@pytest.mark.timeout(120)
def test_example_through_moepipe_sim(tmp_path):
    proc = subprocess.run(
        [str(BIN / "moepipe-sim"), "parallel=pp2_ep2", "model.n_layers=4", "schedule.microbatches=4", "sim.out_trace=false",
         "placer.name=greedy", f"workload.kind={SPIKE}", "workload.strength=8", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=100, env=ENV, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["placer"] == "greedy" and "placer=greedy" in proc.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["meta"]["placer"] == "greedy"
    assert s["iteration_time_s"] <= s["static_iteration_time_s"] * (1 + 1e-9)  # LPT packing never loses to contiguous blocks here
