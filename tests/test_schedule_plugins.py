"""A user's schedule is a plug-in for the simulator and the placers too, not only the runtime;
names in Hydra's `_target_` form (pkg.module.attr) resolve like import paths."""
import json
from pathlib import Path

import pytest

from moepipe.config import ConfigError, validate
from moepipe.plugins import register, resolve, unregister
from moepipe.plugins.builtins import ScheduleSpec
from moepipe.sim.schedules import plan_style, schedule_order

from conftest import compose_cfg

PIPELINING = "torch.distributed.pipelining"


@pytest.fixture
def registered():
    names = []

    def add(name, spec):
        register("schedule", name)(spec)
        names.append(name)
        return name

    yield add
    for name in names:
        unregister("schedule", name)


def reversed_gpipe(pp, v, m):
    """GPipe with backwards in reverse microbatch order (a valid order torch has no class for)."""
    return {r: [("F", r, i) for i in range(m)] + [("B", r, i) for i in reversed(range(m))] for r in range(pp)}


def test_a_spec_reusing_a_torch_class_gets_torch_order_and_style(registered):
    name = registered("my_zbv", ScheduleSpec(f"{PIPELINING}:ScheduleZBVZeroBubble", "v", True))
    assert plan_style(name) == "v"
    assert schedule_order(name, 2, 2, 4) == schedule_order("zbv", 2, 2, 4)
    # torch's constraints follow the class, whatever the name
    name = registered("my_dualpipe", ScheduleSpec(f"{PIPELINING}:ScheduleDualPipeV", "v", True))
    with pytest.raises(ConfigError, match="my_dualpipe needs schedule.microbatches >= 2"):
        validate(compose_cfg(["parallel=pp2", f"schedule.name={name}", "schedule.virtual_stages=2", "schedule.microbatches=2"]))


def test_a_spec_with_its_own_order_is_simulated(registered):
    from moepipe.sim.simulator import simulate_order

    name = registered("reversed_gpipe", ScheduleSpec(f"{PIPELINING}:ScheduleGPipe", order=reversed_gpipe))
    order, s2r = schedule_order(name, 3, 1, 4)
    assert [str(a) for a in order[1]] == ["1F0", "1F1", "1F2", "1F3", "1B3", "1B2", "1B1", "1B0"] and s2r == [0, 1, 2]
    # uniform stages: the same makespan as GPipe (last in, first out changes no idle time)
    comp = [[1.0, 2.0, 0.0]] * 3
    ours = simulate_order(order, s2r, 4, comp)
    gpipe = simulate_order(*schedule_order("gpipe", 3, 1, 4), 4, comp)
    assert ours.makespan == pytest.approx(gpipe.makespan)


def test_a_spec_with_a_bad_order_is_one_line(registered):
    name = registered("bad_kinds", ScheduleSpec(f"{PIPELINING}:ScheduleGPipe", order=lambda pp, v, m: {r: [("X", r, 0)] for r in range(pp)}))
    with pytest.raises(ConfigError, match="action kinds \\['X'\\]"):
        schedule_order(name, 2, 1, 2)
    name = registered("short_order", ScheduleSpec(f"{PIPELINING}:ScheduleGPipe", order=lambda pp, v, m: {0: []}))
    with pytest.raises(ConfigError, match="per pp rank 0..1"):
        schedule_order(name, 2, 1, 2)


def test_a_single_stage_class_without_an_order_says_what_to_add(registered):
    from torch.distributed.pipelining.schedules import ScheduleGPipe

    class MyGPipe(ScheduleGPipe):
        pass

    name = registered("my_gpipe", ScheduleSpec(MyGPipe))
    with pytest.raises(ConfigError, match="give its ScheduleSpec an `order` function"):
        schedule_order(name, 2, 1, 4)


def test_a_wrong_style_is_caught(registered):
    name = registered("zbv_as_loop", ScheduleSpec(f"{PIPELINING}:ScheduleZBVZeroBubble", "loop", True))
    with pytest.raises(ConfigError, match="fix the ScheduleSpec's style"):
        schedule_order(name, 2, 2, 4)


def test_placers_and_moepipe_sim_run_a_registered_schedule(registered, tmp_path):
    """The topo placer plans for a user's V schedule and moepipe-sim simulates it: the same
    numbers as the built-in the spec reuses."""
    from moepipe.cli.sim import run

    name = registered("my_zbv", ScheduleSpec(f"{PIPELINING}:ScheduleZBVZeroBubble", "v", True))
    common = ["parallel=pp2_ep2", "model.n_layers=8", "schedule.microbatches=4", "schedule.virtual_stages=2",
              "sim.out_trace=false", "placer=topo", "workload.kind=zipf", "workload.strength=1.2"]
    mine = run(compose_cfg(common + [f"schedule.name={name}"]), tmp_path / "mine")
    builtin = run(compose_cfg(common + ["schedule.name=zbv"]), tmp_path / "builtin")
    assert mine["iteration_time_s"] == pytest.approx(builtin["iteration_time_s"], rel=1e-12)
    plan = json.loads((tmp_path / "mine" / "plan.json").read_text())
    assert plan["meta"]["placer"] == "topo"


def test_hydra_target_form_resolves_like_an_import_path():
    from moepipe.placement import forecast

    assert resolve("forecaster", "moepipe.placement.forecast.last") is forecast.last
    with pytest.raises(ConfigError) as err:
        resolve("placer", "no_such_pkg.placers.greedy")
    msg = str(err.value)
    assert "\n" not in msg and "as a Hydra _target_" in msg and "No module named 'no_such_pkg'" in msg
    # a name without a dot or colon is not guessed at
    with pytest.raises(ConfigError, match="placer.name='no_such_placer' is not known: choose one of static"):
        resolve("placer", "no_such_placer")


def test_hydra_target_form_through_config_validation():
    cfg = validate(compose_cfg(["workload.kind=moepipe.placement.workloads.zipf"]))
    assert cfg.workload.kind == "moepipe.placement.workloads.zipf"
    with pytest.raises(ConfigError, match="workload.kind='moepipe.placement.workloads.nope' is not known"):
        validate(compose_cfg(["workload.kind=moepipe.placement.workloads.nope"]))


def test_conformance_builds_the_schedule_program():
    """check_schedule runs the executor's validation on the spec's program at a few shapes: an
    order missing its backwards fails naming what to add; an order-only spec (no torch class,
    for moepipe's executor) passes, as every built-in does."""
    from moepipe.plugins import known
    from moepipe.plugins.conformance import ConformanceError, check_schedule

    assert all(check_schedule(name) == 3 for name in known("schedule"))
    assert check_schedule(ScheduleSpec(None, order=reversed_gpipe)) == 3

    def forwards_only(pp, v, m):
        return {r: [("F", r, i) for i in range(m)] for r in range(pp)}

    with pytest.raises(ConformanceError, match=r"\[program\]: at pp=2, virtual_stages=1, microbatches=4: .*never runs the backward"):
        check_schedule(ScheduleSpec(None, order=forwards_only))
    with pytest.raises(ConformanceError, match="neither a torch_class nor an order"):
        check_schedule(ScheduleSpec(None))


def test_a_deadlocking_table_stops_the_launcher_before_any_worker(tmp_path, monkeypatch):
    """launch() checks the schedule's program in preflight: a table whose ranks wait on each
    other is one ConfigError, and no worker is started (patched to fail if it were)."""
    from moepipe.train import launch as launch_mod

    table = tmp_path / "deadlock.csv"
    table.write_text("0F0,0B0,0F1,0B1\n1F1,1B1,1F0,1B0\n")
    monkeypatch.setattr(launch_mod, "_run_workers", lambda *a: pytest.fail("a worker was started"))
    cfg = compose_cfg(["parallel=pp2", "schedule.microbatches=2", "schedule.executor=moepipe", f"schedule.name=file:{table}"])
    with pytest.raises(ConfigError) as err:
        launch_mod.launch(cfg, str(tmp_path / "run"))
    msg = str(err.value)
    assert "\n" not in msg and "the order deadlocks (simulated" in msg
