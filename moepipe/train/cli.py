"""`moepipe-train`: the Hydra application. Composes conf/, validates, trains, prints a summary.

A bad value ends the run before any work with one line on stderr naming the field and the
fix, and exit status 2. A non-finite loss (train.on_nonfinite=stop) or a failed worker: one
line, status 1. SIGTERM: a checkpoint, one line, status 3 (EXIT_PREEMPTED). summary.json is
written only by a run that completed all its steps.
"""
from __future__ import annotations

import os
import re
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
    ]
    lines += placement_lines(summary.get("placement"))
    lines.append(f"  results in {summary['run_dir']}")
    print("\n".join(lines), flush=True)


def _change(old, new) -> str:
    if old is None or new is None:
        return "n/a"
    pct = f" ({(new / old - 1) * 100:+.0f}%)" if old > 0 else ""
    return f"{old:.3g} -> {new:.3g} s{pct}"


def placement_lines(p: dict | None) -> list[str]:
    """The placer's part of the end-of-run summary: re-plans, migrations, bytes, seconds, and
    each re-plan's predicted against measured step time before and after it."""
    if not p:
        return []
    head = f"  placer {p['placer']}"
    if p.get("mode") == "advisory":
        pp, ep, dp = p["advise_mesh"]
        lines = [f"{head} (advisory, for pp{pp} x ep{ep} x dp{dp}): {p['replans']} re-plan(s), would migrate {p['would_migrate']} time(s)"]
        for e in p.get("events", []):
            what = (f"would migrate, layers {e.get('advised_stage_layers')}, {e.get('advised_replicas', 0)} replica(s)"
                    if e["migrate"] else f"would keep ({e['reason']})")
            lines.append(f"    step {e['step']}: {what}; predicted step time {_change(e['predicted_old_s'], e['predicted_new_s'])}")
        return lines
    if p.get("mode") != "replanning":
        return [f"{head}: {p.get('note', 'fixed layout')}"]
    lines = [
        f"{head} every {p['interval']} steps: {p['replans']} re-plan(s), {p['migrations']} migration(s), "
        f"{p['bytes_moved'] / 2**20:.2f} MiB moved in {p['migration_s']:.2f} s (placer solves {p['solve_s']:.2f} s)"
    ]
    for e in p.get("events", []):
        what = f"migrated, layers {e['stage_layers']}" if e["migrate"] else f"kept ({e['reason']})"
        lines.append(
            f"    step {e['step']}: {what}; step time predicted {_change(e['predicted_old_s'], e['predicted_new_s'])}, "
            f"measured {_change(e['measured_before_s'], e['measured_after_s'])}"
        )
    return lines


register_configs()


def _conf_dir() -> str:
    try:
        return conf_dir()
    except ConfigError as err:
        sys.exit(f"moepipe: {err}")


def _config_dirs(argv: list[str]) -> list[str]:
    """conf/ plus the directories the command line adds (--config-dir, hydra.searchpath)."""
    dirs = [_conf_dir()]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        elif arg.startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("file://"):
                    dirs.append(entry[len("file://"):])
    return dirs


def check_yaml_files(argv: list[str]) -> None:
    """Parse the group files the command line selects (`topology=mine`) before Hydra does: a
    syntax error then gets one line naming the file and the place, not Hydra's traceback."""
    import yaml

    for arg in argv:
        match = re.match(r"^\+{0,2}([A-Za-z_][\w/]*)=([\w./-]+)$", arg)
        if not match or "." in match.group(1):
            continue
        group, option = match.groups()
        for base in _config_dirs(argv):
            path = os.path.join(base, group, f"{option}.yaml")
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    yaml.safe_load(f)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                print(f"moepipe: config error: {group}={option} reads {path}, which is not valid YAML ({where}{problem}): fix the file",
                      file=sys.stderr)
                sys.exit(2)


def main() -> None:
    check_yaml_files(sys.argv[1:])
    _hydra_main()


@hydra.main(config_path=_conf_dir(), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    try:
        cfg = validate(dcfg)
    except ConfigError as err:
        print(f"moepipe: config error: {err}", file=sys.stderr)
        sys.exit(2)
    run_dir = cfg.train.out_dir or HydraConfig.get().runtime.output_dir
    from moepipe.train.launch import WorkerFailed, launch
    from moepipe.train.loop import NonFiniteLossError
    from moepipe.train.preempt import EXIT_PREEMPTED, Preempted

    try:
        summary = launch(cfg, run_dir)
    except ConfigError as err:
        print(f"moepipe: config error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:
        print(f"moepipe: train.on_nonfinite={cfg.train.on_nonfinite}: {err} (or set train.on_nonfinite=skip)", file=sys.stderr)
        sys.exit(1)
    except Preempted as err:
        print(f"moepipe: {err}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except WorkerFailed as err:
        print(f"moepipe: {err}", file=sys.stderr)
        sys.exit(1)
    if summary is not None:
        print_summary(summary)


if __name__ == "__main__":
    main()
