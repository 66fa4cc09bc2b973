import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plot_run_reads_metrics_and_draws(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5 - s / 10, "load_balance_mean": 1.5, "load_balance_max": 2.0, "dropped_frac": 0.0} for s in range(1, 6)]
    rows.append({"step": 5, "val_loss": 4.6})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "fig.png"
    proc = subprocess.run([sys.executable, str(ROOT / "analysis/plot_run.py"), str(run), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_plot_run_names_a_missing_metrics_file(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "analysis/plot_run.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "metrics.jsonl does not exist" in proc.stderr
