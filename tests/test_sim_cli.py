"""`moepipe-sim` end to end: the Hydra app writes its files with the documented keys, and bad
configs exit 2 with one line on stderr."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("iteration_time_s", "bubble_fraction", "lower_bound_s", "balanced_bound_s", "balanced_comm_bound_s", "peak_activation_bytes", "a2a_bytes_inter_node")


def run_cli(tmp_path, *overrides, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "moepipe.cli.sim", f"hydra.run.dir={tmp_path}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(90)
def test_cli_writes_summary_trace_gantt_plan(tmp_path):
    p = run_cli(tmp_path, "parallel=pp2_ep2", "model.n_layers=4", "schedule.microbatches=4", "sim.routing=zipf", "sim.zipf_s=1.2",
                "placer=static")
    assert p.returncode == 0, p.stderr
    for f in ("summary.json", "trace.json", "gantt.png", "plan.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    s = json.loads((tmp_path / "summary.json").read_text())
    for k in KEYS:
        assert k in s, k
    assert len(s["peak_activation_bytes"]) == 4 and min(s["peak_activation_bytes"]) > 0
    assert 0 < s["lower_bound_s"] <= s["balanced_bound_s"] <= s["balanced_comm_bound_s"] <= s["iteration_time_s"]
    assert 0 < s["bubble_fraction"] < 1 and s["sim"]["routing"] == "zipf"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["stage_layers"] == [[0, 2], [2, 4]] and plan["ep"] == 2
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert "iteration_time_s=" in p.stdout and "placer=static" in p.stdout
    assert s["placer"] == "static" and s["static_iteration_time_s"] == s["iteration_time_s"]


@pytest.mark.timeout(90)
def test_cli_mixtral_on_128_gpus(tmp_path):
    p = run_cli(tmp_path, "model=mixtral_8x7b", "topology=ib_16x8", "parallel.pp=16", "parallel.ep=8", "schedule.microbatches=32",
                "train.batch_size=256", "train.seq_len=4096", "sim.out_trace=false")
    assert p.returncode == 0, p.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 128 and len(s["peak_activation_bytes"]) == 128
    assert s["a2a_bytes_inter_node"] == 0 and s["a2a_bytes_intra_node"] > 0  # ep=8 groups sit inside a node
    assert s["iteration_time_s"] > s["balanced_bound_s"] > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "overrides,start",
    [
        (["parallel.pp=8"], "parallel.pp*schedule.virtual_stages=8 > model.n_layers=4"),
        (["parallel.pp=4", "parallel.ep=8", "schedule.microbatches=4", "train.batch_size=32"], "parallel.pp*ep*dp=32 > topology devices=16"),  # local_cpu: 16
        (["sim.routing=bogus"], "sim.routing='bogus' is not known"),
    ],
)
def test_cli_config_error_exits_2_with_one_line(tmp_path, overrides, start):
    p = run_cli(tmp_path, *overrides)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), p.stderr


SKEWED = ["parallel=pp2_ep2", "model.n_layers=4", "schedule.microbatches=4", "sim.out_trace=false",
          "workload.kind=hot_rank", "workload.strength=4"]


def simulate_in_process(tmp_path, name, *overrides):
    from conftest import compose_cfg
    from moepipe.cli.sim import run, summary_line

    s = run(compose_cfg(list(overrides), validated=False, single_process=False), tmp_path / name)
    return s, summary_line(s)


@pytest.mark.timeout(60)
def test_cli_plans_with_the_configured_placer_under_the_workload(tmp_path):
    static, static_line = simulate_in_process(tmp_path, "static", *SKEWED, "placer=static")
    topo, topo_line = simulate_in_process(tmp_path, "topo", *SKEWED, "placer=topo")
    assert static["placer"] == "static" and topo["placer"] == "topo"
    assert "placer=topo" in topo_line and "workload.kind=hot_rank" in topo["routing"]
    # a 4x hot EP rank: topo's plan is simulated, and it is faster than the static one it reports beside it
    assert topo["iteration_time_s"] < 0.95 * static["iteration_time_s"]
    assert topo["static_iteration_time_s"] == pytest.approx(static["iteration_time_s"], rel=1e-9)
    assert topo["placer_predicted_s"] == pytest.approx(topo["iteration_time_s"], rel=0.05)  # the placer's own estimate
    plan = json.loads((tmp_path / "topo" / "plan.json").read_text())
    assert plan["meta"]["placer"] == "topo"
    # without the workload the same placer plans for uniform routing, and hot_rank's skew is gone
    uniform, _ = simulate_in_process(tmp_path, "uniform", *SKEWED[:-2], "placer=static")
    assert uniform["routing"] == "uniform" and uniform["iteration_time_s"] < static["iteration_time_s"]


@pytest.mark.timeout(90)
def test_cli_reads_token_origins_from_a_per_source_workload_and_reports_bytes_per_link_class(tmp_path):
    # 4 EP ranks as 2 nodes x 2, local_hot: each rank's data prefers its own block of experts,
    # while the job-wide load is uniform; the origins reach the placer and the simulator
    common = ["topology=local_cpu_2nodes", "parallel.pp=1", "parallel.ep=4", "parallel.dp=1", "model.n_layers=2",
              "schedule.microbatches=2", "sim.out_trace=false", "workload.kind=local_hot", "workload.strength=8", "placer.replica_slots=1"]
    static, _ = simulate_in_process(tmp_path, "static", *common, "placer=static")
    topo, line = simulate_in_process(tmp_path, "topo", *common, "placer=topo")
    for s in (static, topo):
        assert s["token_origins"] == "per source EP rank (workload)" and "per source EP rank" in s["routing"]
        assert s["a2a_bytes_intra_node"] > 0 and s["a2a_bytes_inter_node"] > 0
        # the placer's own byte figures are the simulator's (same rule, same origins)
        assert s["placer_a2a_bytes_inter_node"] == pytest.approx(s["a2a_bytes_inter_node"], rel=1e-9)
        assert s["placer_a2a_bytes_intra_node"] == pytest.approx(s["a2a_bytes_intra_node"], rel=1e-9)
    assert topo["a2a_bytes_inter_node"] < 0.8 * static["a2a_bytes_inter_node"]  # homes where the tokens start
    assert "a2a_bytes_inter_node=" in line and "a2a_bytes_intra_node=" in line
    # with pp=1 x dp=1 there is only one EP order: nothing to compare
    assert topo["ep_layout"] is None
    two = ["topology=local_cpu_2nodes", "parallel.pp=2", "parallel.ep=2", "parallel.dp=1", "model.n_layers=2", "schedule.microbatches=2",
           "sim.out_trace=false", "placer=topo"]
    lay, line = simulate_in_process(tmp_path, "layout", *two)
    assert lay["ep_layout"]["runtime"] == "ep_inner" and set(lay["ep_layout"]["layouts"]) == {"ep_inner", "ep_outer"}
    assert lay["ep_layout"]["layouts"]["ep_inner"]["ep_group_nodes"] == 1 and lay["ep_layout"]["layouts"]["ep_outer"]["ep_group_nodes"] == 2
    assert f"ep_layout_best={lay['ep_layout']['best']}" in line
