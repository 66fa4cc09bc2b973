"""Where results go: metrics.jsonl and summary.json in the run dir (the record analysis reads),
Weights & Biases (offline by default), and a progress display. Only the metrics rank logs.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
import torch


def routing_metrics(stats_by_layer: dict[int, Any]) -> dict[str, float]:
    """Balancedness (max/mean expert demand, 1 is perfect) and dropped-token fraction.

    Takes host statistics (`RoutingStats.host()`, what the trainers pass once per step);
    device-side ones are read back here, one read per layer."""
    if not stats_by_layer:
        return {}
    balance, dropped_num, asked, aux, z = [], 0, 0, [], []
    for stats in stats_by_layer.values():
        if isinstance(stats.asked, torch.Tensor):  # still the layer's device-side counters
            stats = stats.host()
        demand = stats.demand.double()
        if demand.sum() > 0:
            balance.append(float(demand.max() / demand.mean()))
        dropped_num += stats.asked - int(stats.kept.sum())
        asked += stats.asked
        if stats.calls:
            aux.append(stats.aux_loss_sum / stats.calls)
            z.append(stats.z_loss_sum / stats.calls)
    return {
        "aux_loss": float(np.mean(aux)) if aux else 0.0,
        "z_loss": float(np.mean(z)) if z else 0.0,
        "load_balance_mean": float(np.mean(balance)) if balance else 1.0,
        "load_balance_max": float(np.max(balance)) if balance else 1.0,
        "dropped_frac": dropped_num / asked if asked else 0.0,
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str, obj: Any) -> None:
    """Write then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def sweep_identity(experiment: str, run_dir: str) -> tuple[str | None, str]:
    """(W&B group, run name). A Hydra multirun job's dir is <sweep dir>/<job num> with
    multirun.yaml in the sweep dir: its jobs share a group named after the sweep, and each
    run is named by its job number and overrides. Works in spawned workers too, where
    Hydra's runtime config is not available."""
    run_dir = os.path.abspath(run_dir.rstrip("/"))
    sweep = os.path.dirname(run_dir)
    job = os.path.basename(run_dir)
    if not os.path.isfile(os.path.join(sweep, "multirun.yaml")):
        return None, f"{experiment}-{job}"
    overrides = []
    path = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if os.path.isfile(path):
        from omegaconf import OmegaConf

        overrides = [str(o) for o in OmegaConf.load(path)]
    suffix = " ".join(overrides)
    return f"{experiment}-{os.path.basename(sweep)}", f"{experiment}-{job}" + (f" {suffix}"[:80] if suffix else "")


class WandbSink:
    def __init__(self, cfg, run_dir: str, config_dict: dict):
        import wandb

        self.wandb = wandb
        w = cfg.logger.wandb
        os.makedirs(w.dir or run_dir, exist_ok=True)
        group, name = sweep_identity(cfg.experiment_name, run_dir)
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            group=w.group or group,
            tags=list(w.tags),
            name=name,
            mode=w.mode,
            dir=w.dir or run_dir,
            config=config_dict,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, row: dict, step: int, expert_load: dict[int, np.ndarray] | None) -> None:
        data = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        for layer, load in (expert_load or {}).items():
            # One bin per expert: the histogram reads as load by expert id.
            edges = np.arange(len(load) + 1, dtype=np.float64)
            data[f"expert_load/layer{layer}"] = self.wandb.Histogram(np_histogram=(load.astype(np.float64), edges))
        self.run.log(data, step=step)

    def summary(self, summary: dict) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class Progress:
    """A rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, mode: str, total: int):
        self.total = total
        use_rich = mode == "rich" or (mode == "auto" and sys.stdout.isatty())
        self.mode = "none" if mode == "none" else ("rich" if use_rich else "plain")
        self.bar = None
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.description}")
            )
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def update(self, step: int, row: dict | None) -> None:
        text = ""
        if row is not None:
            text = f"loss {row['loss']:.4f}"
            if "val_loss" in row:
                text += f" val {row['val_loss']:.4f}"
            text += f" {row.get('tokens_per_s', 0):,.0f} tok/s"
        if self.mode == "rich":
            self.bar.update(self.task, completed=step, **({"description": text} if text else {}))
        elif self.mode == "plain" and row is not None:
            print(f"step {step}/{self.total} {text} lr {row['lr']:.2e} balance {row.get('load_balance_mean', 1):.2f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class MetricsLogger:
    """metrics.jsonl rows + W&B + progress, from the metrics rank only (others get a no-op)."""

    def __init__(self, cfg, run_dir: str, config_dict: dict, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb: WandbSink | None = None
        self.progress: Progress | None = None
        self.file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        # tokens per expert per MoE layer at every logged step (heatmaps, placement studies)
        self.load_file = open(os.path.join(run_dir, "expert_load.jsonl"), "a", buffering=1)
        if cfg.logger.name == "wandb" and cfg.logger.wandb.mode != "disabled":
            self.wandb = WandbSink(cfg, run_dir, config_dict)
        self.progress = Progress(cfg.logger.progress, cfg.train.steps)
        self.started = time.time()

    def log(self, row: dict, expert_load: dict[int, np.ndarray] | None = None) -> None:
        if not self.enabled:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.file.write(json.dumps(row, default=_json_default) + "\n")
        if expert_load:
            load = {str(layer): counts for layer, counts in expert_load.items()}
            self.load_file.write(json.dumps({"step": row["step"], "tokens_per_expert": load}, default=_json_default) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, row["step"], expert_load)
        self.progress.update(row["step"], row)

    def tick(self, step: int) -> None:
        if self.enabled and self.progress is not None and self.progress.mode == "rich":
            self.progress.update(step, None)

    def event(self, row: dict) -> None:
        """Non-step records (evaluations between logs, migrations): same file, tagged."""
        if self.enabled:
            self.file.write(json.dumps(row, default=_json_default) + "\n")
            if self.wandb is not None:
                self.wandb.log(row, row["step"], None)

    def close(self, summary: dict | None, exit_code: int = 0) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.close()
        if summary is not None:
            write_json(os.path.join(self.run_dir, "summary.json"), summary)
        if self.wandb is not None:
            if summary is not None:
                self.wandb.summary(summary)
            self.wandb.finish(exit_code)
            self.wandb = None
        if self.file is not None:
            self.file.close()
            self.load_file.close()
            self.file = None
