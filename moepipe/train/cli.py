"""`moepipe-train`: the Hydra application. Composes conf/, validates, trains, prints a summary.

A bad value ends the run before any work with one line on stderr naming the field and the
fix, and exit status 2.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moepipe.config import ConfigError, conf_dir, register_configs, validate


def print_summary(summary: dict) -> None:
    p = summary.get("parameters", {})
    lines = [
        f"moepipe: {summary['steps']} steps in {summary['wall_time_s']:.1f} s on {summary['world_size']} process(es), {summary['device']} {summary['dtype']}",
        f"  params {p.get('total', 0) / 1e6:.2f}M total, {p.get('active', 0) / 1e6:.2f}M active per token",
        f"  final train loss {summary['final_train_loss']:.4f}  val loss {summary['final_val_loss']:.4f} nats/token",
        f"  throughput {summary['tokens_per_s']:,.0f} tokens/s",
        f"  results in {summary['run_dir']}",
    ]
    print("\n".join(lines), flush=True)


register_configs()


def _conf_dir() -> str:
    try:
        return conf_dir()
    except ConfigError as err:
        sys.exit(f"moepipe: {err}")


@hydra.main(config_path=_conf_dir(), config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = validate(dcfg)
    except ConfigError as err:
        print(f"moepipe: config error: {err}", file=sys.stderr)
        sys.exit(2)
    run_dir = cfg.train.out_dir or HydraConfig.get().runtime.output_dir
    from moepipe.train.launch import WorkerFailed, launch

    try:
        summary = launch(cfg, run_dir)
    except ConfigError as err:
        print(f"moepipe: config error: {err}", file=sys.stderr)
        sys.exit(2)
    except WorkerFailed as err:
        print(f"moepipe: {err}", file=sys.stderr)
        sys.exit(1)
    if summary is not None:
        print_summary(summary)


if __name__ == "__main__":
    main()
