"""Expert-load statistics from a run's results files (expert_load.jsonl, metrics.jsonl).

Pure functions over plain lists/arrays, so figure scripts and tests share them.
"""
from __future__ import annotations

import json
import os

import numpy as np


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: pass a run directory written by moepipe-train")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_matrix(rows: list[dict], layer: str | int) -> tuple[np.ndarray, np.ndarray]:
    """(steps [T], tokens routed to each expert [T, E]) of one MoE layer, from expert_load.jsonl rows."""
    key = str(layer)
    kept = [r for r in rows if key in r.get("tokens_per_expert", {})]
    steps = np.array([r["step"] for r in kept], dtype=np.int64)
    loads = np.array([r["tokens_per_expert"][key] for r in kept], dtype=np.float64)
    return steps, loads.reshape(len(kept), -1)


def layers_of(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        seen += [k for k in r.get("tokens_per_expert", {}) if k not in seen]
    return sorted(seen, key=int)


def balance(loads: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of loads [T, E]: max/mean (1 = perfectly balanced; E = everything on one expert),
    coefficient of variation (std/mean), and the share of the busiest expert."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1)
    safe = np.where(mean > 0, mean, 1.0)
    total = np.where(loads.sum(axis=-1) > 0, loads.sum(axis=-1), 1.0)
    return {
        "max_over_mean": np.where(mean > 0, loads.max(axis=-1) / safe, 1.0),
        "cv": np.where(mean > 0, loads.std(axis=-1) / safe, 0.0),
        "max_share": loads.max(axis=-1) / total,
    }


def run_balance(run_dir: str) -> dict:
    """Balancedness over steps of every MoE layer of a run, plus its mean over layers."""
    rows = read_jsonl(os.path.join(run_dir, "expert_load.jsonl"))
    layers = layers_of(rows)
    per_layer, steps = {}, None
    for layer in layers:
        steps, loads = load_matrix(rows, layer)
        b = balance(loads)
        per_layer[layer] = {k: v.tolist() for k, v in b.items()} | {"loads": loads.tolist()}
    mean = {k: np.mean([per_layer[l][k] for l in layers], axis=0).tolist() for k in ("max_over_mean", "cv", "max_share")} if layers else {}
    return {"steps": [] if steps is None else steps.tolist(), "layers": per_layer, "mean_over_layers": mean}
