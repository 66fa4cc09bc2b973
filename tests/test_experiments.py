"""Every benchmark and figure script in experiments/ runs: its `--quick` mode (the same code path
on the smallest sizes) runs as a subprocess, at most two at a time, and must finish, write its
results file where `--out` says (never into results/), and print its headline line last.
A new experiments/*.py without a quick mode (and a row in SCRIPTS) fails the suite."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
LIBRARIES = {"fig_common.py"}  # imported by the scripts, not run
TIMEOUT_S = 120

# script -> the headline its quick run prints last (`key=value`); longest-running first, so that
# two at a time finish together.
SCRIPTS = {
    "bench_migration_memory": r"peak_growth_ratio_vs_ref=[0-9.]+",
    "soak": r"rss_growth=-?[0-9.]+",
    "bench_sim": r"worst_relative_error=[0-9.]+",
    "fig_zero_bubble": r"bubble_simulated_zbv_p2=[0-9.]+",
    "fig_placement": r"topo_speedup_vs_static_sim_8=h100:[0-9.]+,hetero:[0-9.]+",
    "fig_interleaved": r"max_abs_ratio_simulated_minus_formula=[0-9.e+-]+",
    "bench_dynamic": r"speedup=[0-9.]+",
    "bench_moe_layer": r"speedup_e64=\S+",
    "fig_bubble": r"max_abs_simulated_minus_formula=[0-9.e+-]+",
    "bench_runtime": r"overhead_vs_bare=[0-9.]+",
    "bench_executor": r"worst_ratio_moepipe_vs_torch=[0-9.]+",
    "fig_memory": r"max_abs_measured_minus_expected_inflight=[0-9.]+",
    "bench_a2a": r"hier_over_flat_measured=[0-9.]+",
    "fig_capacity": r"dropped_frac_mean_by_cf=1:[0-9.]+,0:0\.000",
    "fig_balance": r"max_over_mean_last_quarter=aux_loss:[0-9.]+,aux_free:[0-9.]+,none:[0-9.]+",
    "bench_placer": r"geomean_speedup_topo_vs_static_skewed=[0-9.]+",
    "bench_sim_scale": r"sim_time_s=[0-9.]+",
    "fig_tp_mesh": r"chosen_mesh_tokens_per_s=tp\d+xpp\d+xep\d+xdp\d+:[0-9.e+]+",
    "eval_forecast": r"tv_periodic_over_ema_moving=[0-9.]+",
    "bench_shadows": r"speedup_shadow_vs_plan_moving=[0-9.]+",
    "fig_2bw": r"final_loss_2bw_minus_1f1b=-?[0-9.]+",
    "fig_chimera": r"max_abs_simulated_minus_formula_chimera=[0-9.e+-]+",
    "bench_2bw": r"measured_speedup_2bw_vs_1f1b=[0-9.]+",
}
FIGURES = {"fig_bubble": ["fig_bubble", "fig_gantt"], "fig_memory": ["fig_memory"], "fig_interleaved": ["fig_interleaved"],
           "fig_zero_bubble": ["fig_zero_bubble"], "fig_capacity": ["fig_capacity"], "fig_balance": ["fig_balance", "fig_load_heatmap"],
           "fig_placement": ["fig_placement"], "fig_2bw": ["fig_2bw"], "fig_tp_mesh": ["fig_tp_mesh"], "fig_chimera": ["fig_chimera"]}
OWN_PROVENANCE = set(SCRIPTS) - {"bench_moe_layer"}  # bench_moe_layer.py records its own run_info (another owner's file)


def scripts_on_disk() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.name not in LIBRARIES)


def _results_snapshot() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in (ROOT / "results").iterdir()}


def _run(name: str, out_dir: Path) -> dict:
    out = out_dir / name / f"{name}.json"
    out.parent.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), "--quick", "--out", str(out)],
                              cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", (e.stdout or b"").decode(errors="replace"), (e.stderr or b"").decode(errors="replace")
    return {"rc": rc, "stdout": stdout, "stderr": stderr, "out": out, "wall_s": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Every script's quick mode, two at a time (the suite has 2 cores); results/ must not change."""
    out_dir = tmp_path_factory.mktemp("quick")
    before = _results_snapshot()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, name, out_dir) for name in SCRIPTS}
        runs = {name: f.result() for name, f in futures.items()}
    runs["_results_changed"] = sorted(k for k, v in _results_snapshot().items() if before.get(k) != v)
    return runs


def test_every_script_has_a_quick_mode_and_a_row_here():
    on_disk = scripts_on_disk()
    missing = [s for s in on_disk if s not in SCRIPTS]
    assert not missing, f"experiments/{missing[0]}.py has no row in tests/test_experiments.py SCRIPTS: give it --quick and add it"
    assert not [s for s in SCRIPTS if s not in on_disk], "SCRIPTS names a script that is gone"
    for s in on_disk:
        src = (EXPERIMENTS / f"{s}.py").read_text()
        assert "--quick" in src or "add_output_args" in src, f"experiments/{s}.py has no --quick option"


@pytest.mark.timeout(900)  # the first of these runs the whole fixture (~2 min on 2 quiet cores; a loaded machine took 6)
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_mode_runs_writes_and_prints_its_headline(quick_runs, name):
    r = quick_runs[name]
    assert r["rc"] == 0, f"{name} --quick: exit {r['rc']} after {r['wall_s']:.0f} s\n{r['stderr'][-3000:]}"
    assert r["out"].is_file(), f"{name} --quick did not write {r['out']}"
    data = json.loads(r["out"].read_text())
    assert isinstance(data, dict) and data
    lines = [line for line in r["stdout"].splitlines() if line.strip()]
    assert lines and re.fullmatch(SCRIPTS[name], lines[-1]), f"{name}: last line {lines[-1:]!r} is not the headline {SCRIPTS[name]!r}"
    if name in OWN_PROVENANCE:
        prov = data["provenance"]
        assert prov["git_commit"] and "--quick" in prov["command"] and prov["packages"]["torch"] and prov["environment"]["python"]
        assert prov["args"]["quick"] is True
    for fig in FIGURES.get(name, []):
        png = r["out"].parent / "figures" / f"{fig}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", f"{name} --quick did not draw {png}"


def test_quick_runs_leave_results_alone(quick_runs):
    assert quick_runs["_results_changed"] == [], f"quick runs touched results/: {quick_runs['_results_changed']}"


def test_quick_refuses_to_write_into_results():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = _results_snapshot()
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / "bench_sim_scale.py"), "--quick"], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "--out outside results/" in proc.stderr
    assert _results_snapshot() == before


def test_results_dir_needs_a_clean_checkout_or_allow_dirty(tmp_path, monkeypatch):
    sys.path.insert(0, str(EXPERIMENTS))
    import argparse

    import fig_common as fc

    ap = argparse.ArgumentParser()
    fc.add_output_args(ap, str(tmp_path / "results" / "x.json"))
    states = {"state": "0" * 40 + "-dirty"}
    import moepipe.train.run_info as run_info

    monkeypatch.setattr(run_info, "git_state", lambda path: states["state"])  # check_output looks it up there
    with pytest.raises(SystemExit, match="dirty checkout"):
        fc.check_output(ap.parse_args([]))
    assert fc.check_output(ap.parse_args(["--allow-dirty"])) == str(tmp_path / "results" / "x.json")
    elsewhere = str(tmp_path / "elsewhere" / "x.json")  # not results/: dirty is fine (tests, scratch runs)
    assert fc.check_output(ap.parse_args(["--out", elsewhere])) == elsewhere
    states["state"] = "0" * 40
    assert fc.check_output(ap.parse_args([])) == str(tmp_path / "results" / "x.json")
    with pytest.raises(SystemExit, match="--out outside results/"):
        fc.check_output(ap.parse_args(["--quick"]))
