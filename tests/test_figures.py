"""Paper-reproduction helpers (experiments/fig_common.py) and the analysis figures: formulas,
uniform-stage simulation, the saved-tensor memory probe, load statistics, results files and
drawing from results files. Fast: no distributed runs."""
import csv
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT))

import fig_common as fc  # noqa: E402
from analysis.loadstats import balance, load_matrix, run_balance  # noqa: E402


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (8, 16)])
def test_uniform_simulation_matches_single_stage_formula(name, p, m):
    assert fc.simulate_uniform(name, p, m).bubble_fraction == pytest.approx(fc.bubble_formula(p, m))


@pytest.mark.parametrize("p,m,v", [(4, 8, 2), (4, 16, 4), (2, 8, 2)])
def test_interleaved_formula_and_ratio(p, m, v):
    f = fc.simulate_uniform("interleaved_1f1b", p, m, v).bubble_fraction
    assert f == pytest.approx(fc.bubble_formula(p, m, v))
    assert f / (1 - f) == pytest.approx(fc.bubble_ratio_formula(p, m, v))


def test_zero_bubble_formula_and_memory_units():
    p, m = 4, 8
    for name in ("interleaved_zb", "zbv"):
        assert fc.simulate_uniform(name, p, m, 2, n_layers=2 * p).bubble_fraction == pytest.approx(fc.zb_bubble_formula(p, m))
    one = fc.inflight_units("1f1b", p, m)
    assert one["peak_inflight_per_stage"] == [4, 3, 2, 1] and one["peak_units_per_rank"] == [4, 3, 2, 1]
    assert fc.inflight_units("gpipe", p, m)["peak_units_per_rank"] == [m] * p


def test_replay_of_uniform_actions_gives_the_formula():
    p, m = 2, 8
    acts = {f"{s}{k}": t for s in range(p) for k, t in (("F", 1.0), ("B", 2.0))}
    assert fc.replay_bubble("1f1b", p, 1, m, acts) == pytest.approx(fc.bubble_formula(p, m))


class _Stage:
    """Stand-in for a PipelineStage: forward/backward of one microbatch through a small MLP."""

    def __init__(self, model):
        self.model, self.stage_index, self.is_last, self.out = model, 0, True, {}

    def forward_one_chunk(self, mb, args, kwargs=None, save_forward_output=True):
        self.out[mb] = self.model(args[0]).square().sum()

    def backward_one_chunk(self, mb, loss=None, full_backward=True, last_backward=False):
        self.out.pop(mb).backward()

    def backward_weight_one_chunk(self, mb, last_backward=False):
        pass


class _Schedule:
    def __init__(self, stage, order):
        self._stage, self.order = stage, order

    def _maybe_compute_loss(self, stage, out, tgt, mb):
        pass

    def step(self, x):
        for kind, mb in self.order:
            if kind == "F":
                self._stage.forward_one_chunk(mb, (x,))
            else:
                self._stage.backward_one_chunk(mb)


@pytest.mark.parametrize("order,expected", [("gpipe", 4), ("alternate", 1)])
def test_probe_counts_saved_activations_not_parameters(order, expected):
    m = 4
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32))
    seq = [("F", i) for i in range(m)] + [("B", i) for i in range(m)] if order == "gpipe" else [(k, i) for i in range(m) for k in "FB"]
    trainer = SimpleNamespace(device=torch.device("cpu"), modules={0: model}, schedule=_Schedule(_Stage(model), seq))
    probe = fc.Probe(trainer)
    probe.memory = True
    x = torch.randn(16, 32, requires_grad=True)
    trainer.schedule.step(x)
    rec = probe.memory_record(m)
    # Everything saved is released after backward, and the peak is `expected` microbatches' worth.
    assert rec["live_after_step"] == 0
    per_mb = rec["stage_bytes_per_microbatch"]["0"]
    assert per_mb > 0 and rec["peak_saved_bytes"] / per_mb == pytest.approx(expected, rel=0.3)
    # Parameters are excluded: one microbatch saves far less than the weights of a layer pair would add.
    assert all(k[0] in "FB" for k in [e[0] for e in probe.events])
    assert len(probe.events) == 2 * m


def test_balance_statistics():
    b = balance(np.array([[1, 1, 1, 1], [4, 0, 0, 0], [0, 0, 0, 0]]))
    assert b["max_over_mean"].tolist() == [1.0, 4.0, 1.0]
    assert b["cv"][0] == 0 and b["cv"][1] == pytest.approx(np.sqrt(3))
    assert b["max_share"].tolist() == [0.25, 1.0, 0.0]


def test_run_balance_reads_expert_load(tmp_path):
    rows = [{"step": s, "tokens_per_expert": {"1": [s, 1, 1, 1], "3": [1, 1, 1, 1]}} for s in (1, 2, 3)]
    (tmp_path / "expert_load.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    steps, loads = load_matrix(rows, 1)
    assert steps.tolist() == [1, 2, 3] and loads.shape == (3, 4)
    b = run_balance(str(tmp_path))
    assert list(b["layers"]) == ["1", "3"] and b["steps"] == [1, 2, 3]
    assert b["layers"]["3"]["max_over_mean"] == [1.0, 1.0, 1.0]
    assert b["mean_over_layers"]["max_over_mean"][2] == pytest.approx((3 / 1.5 + 1) / 2)


def test_save_results_writes_json_csv_and_provenance(tmp_path):
    path = fc.save_results("fig_x", {"provenance": fc.provenance({"a": 1}, ["model=tiny"], 0)},
                           [{"m": 2, "bubble": 0.3, "curve": [1, 2]}, {"m": 4, "bubble": 0.2, "extra": "x"}], out_dir=str(tmp_path))
    data = json.loads(Path(path).read_text())
    assert data["rows"][0]["curve"] == [1, 2]
    prov = data["provenance"]
    assert prov["seed"] == 0 and "git_commit" in prov and "environment" in prov and prov["config_overrides"] == ["model=tiny"]
    with open(tmp_path / "fig_x.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["m"] for r in got] == ["2", "4"] and "curve" not in got[0] and got[1]["extra"] == "x"


def test_figures_redraw_from_committed_results(tmp_path):
    from analysis.figures import DRAWERS, draw_all

    present = [n for n in DRAWERS if (ROOT / "results" / f"{n}.json").is_file()]
    assert present == list(DRAWERS), f"results/ lacks {set(DRAWERS) - set(present)}: run make figures and commit results/"
    out = draw_all(str(ROOT / "results"), str(tmp_path))
    assert len(out) >= len(present)
    for p in out:
        assert os.path.getsize(p) > 10_000 and Path(p).read_bytes()[:4] == b"\x89PNG"


def test_draw_figure_names_a_missing_results_file(tmp_path):
    from analysis.figures import draw_figure

    with pytest.raises(FileNotFoundError, match="run experiments/fig_bubble.py"):
        draw_figure("fig_bubble", str(tmp_path), str(tmp_path))
