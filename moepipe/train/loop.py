"""The training loop (one process). One step: the global batch is split into
`schedule.microbatches` pieces whose gradients accumulate, exactly the arithmetic a
pipeline schedule performs, so this is the reference the distributed runtime must match.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf

from moepipe.config import ConfigError, MoepipeConfig, world_size
from moepipe.data import build_corpus, train_batch, val_batches
from moepipe.model import MoETransformer, build_model, count_parameters, lm_loss
from moepipe.parallel.grad_sync import fill_missing_grads
from moepipe.train.checkpoint import attempt_number, checkpoint_root, find_resume, load_checkpoint, mesh_of, plan_for_resume, save_checkpoint
from moepipe.train.metrics import MetricsLogger, routing_metrics
from moepipe.train.optim import WeightStash, build_optimizer, delayed_update, lr_at, set_lr
from moepipe.train.preempt import EXIT_PREEMPTED, Preempted, StopOnSignal, inject_sigterm
from moepipe.train.run_info import run_info
from moepipe.train.workload import SlowDevice, routing_skew


class NonFiniteLossError(RuntimeError):
    pass


def resolve_device(cfg: MoepipeConfig) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(cfg: MoepipeConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default, fp32 (no autocast) on CPU."""
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing (fp32) when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    tokens: int
    routing: dict = field(default_factory=dict)
    expert_load: dict = field(default_factory=dict)

    @classmethod
    def from_stats(cls, loss: float, grad_norm: float, lr: float, start: float, tokens: int, stats: dict) -> "StepResult":
        """The step's record, timed from `start`, with routing metrics from per-layer stats."""
        return cls(
            loss=loss,
            grad_norm=grad_norm,
            lr=lr,
            seconds=time.perf_counter() - start,
            tokens=tokens,
            routing=routing_metrics(stats),
            expert_load={lid: s.demand.numpy().copy() for lid, s in stats.items()},
        )


def emulated_speed(cfg: MoepipeConfig) -> float:
    """workload.emulate_speed: the speed of the topology's device 0 (the one device a single
    process runs on); 1.0 when emulation is off."""
    if not cfg.workload.emulate_speed:
        return 1.0
    from moepipe.placement.topology import from_config

    return float(from_config(cfg.topology, 1).devices[0].speed)


def single_process_placer_note(cfg: MoepipeConfig) -> str | None:
    """Why a re-planning placer only advises in one process, or None when nothing is configured
    to re-plan. One process holds every layer and expert, so nothing can move."""
    pc = cfg.placer
    if pc.name == "static" or pc.interval <= 0:
        return None
    # a notice, not an error: error lines alone start with "moepipe:" (scripts count them)
    head = f"moepipe (one process): placer.name={pc.name} placer.interval={pc.interval} is advisory (parallel.pp*ep*dp=1): "
    if pc.advise_mesh:
        pp, ep, dp = pc.advise_mesh
        return (head + f"nothing moves; it plans for placer.advise_mesh=[{pp},{ep},{dp}] (pp x ep x dp) from this run's routing "
                "statistics and logs what it would do there as advisory replan events")
    return (head + "one process holds every layer and expert, so there is nothing to move; its decisions are logged as "
            "advisory replan events; set placer.advise_mesh=[pp,ep,dp] to see what it would do on that mesh, or use "
            "parallel.pp>1 or parallel.ep>1 to re-plan")


class Trainer:
    """Owns model, optimizer and data for one process; `train_step(step)` does one update."""

    world_size = 1

    def __init__(self, cfg: MoepipeConfig, model: MoETransformer | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed)
        self.corpus = build_corpus(cfg.data, cfg.train.seq_len)
        if self.corpus.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} < the data's vocabulary ({self.corpus.vocab_size}, data={cfg.data.name}): "
                f"set model.vocab_size>={self.corpus.vocab_size}"
            )
        self.model = (model or build_model(cfg.model, cfg.moe, cfg.train.seed)).to(self.device)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.optimizer = build_optimizer(self.model, cfg.optim)
        # schedule=pipedream_2bw: the reference of its delayed rule (step t's gradient at W(t-1))
        self.stash = WeightStash(self.model.parameters()) if delayed_update(cfg.schedule.name) else None
        self.val_set = val_batches(self.corpus, cfg.train.eval_batches, cfg.train.batch_size, cfg.train.seq_len)
        self.speed = emulated_speed(cfg)
        self.slowdown = SlowDevice(self.model, self.speed) if self.speed < 1 else None
        # advisory re-plan loop: observes every step and logs the decision the configured placer
        # would take for this job, or for placer.advise_mesh's mesh (starting from its static
        # plan, then following its own advice); None when no re-planning placer is configured
        self.replan = None
        if single_process_placer_note(cfg):
            from moepipe.config import advisory_config, world_size
            from moepipe.placement.replan import ReplanLoop, default_plan
            from moepipe.placement.topology import from_config

            target = advisory_config(cfg)
            self.replan = ReplanLoop(target, lambda: from_config(cfg.topology, world_size(target)))
            self._layout = default_plan(target)  # not `plan`: checkpoints record a trainer's plan only when it can move

    def _autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    def train_step(self, step: int) -> StepResult:
        cfg = self.cfg
        start = time.perf_counter()
        self.model.train()
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        inputs, targets = train_batch(self.corpus, step, cfg.train.seed, cfg.train.batch_size, cfg.train.seq_len)
        m = cfg.schedule.microbatches
        self.model.set_aux_loss_scale(1.0 / m)
        self.model.reset_routing_stats()
        self.model.set_routing_skew(routing_skew(cfg, step))
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        if self.stash is not None:
            self.stash.compute()
        for x, y in zip(inputs.chunk(m), targets.chunk(m)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                loss = lm_loss(self.model(x), y)
            (loss / m).backward()
            total += float(loss.detach()) / m
        if self.stash is not None:
            self.stash.restore()
        if not math.isfinite(total):
            raise NonFiniteLossError(f"loss={total} at step {step}: lower optim.lr or raise optim.warmup_steps")
        fill_missing_grads(list(self.model.parameters()))
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(grad_norm):  # a finite loss can still overflow in backward
            raise NonFiniteLossError(f"grad_norm={grad_norm} at step {step}: lower optim.lr or raise optim.warmup_steps")
        if self.stash is not None:
            self.stash.before_update()
        self.optimizer.step()
        # Aux-loss-free bias moves after the update, from this step's demand (DeepSeek-V3).
        self.model.update_expert_bias()
        stats = {lid: moe.stats.host() for lid, moe in self.model.moe_layers()}  # the step's one read-back
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        result = StepResult.from_stats(total, grad_norm, lr, start, inputs.numel(), stats)
        if self.replan is not None:
            demand = {lid: s.demand.double().numpy() for lid, s in stats.items()}
            self.replan.observe(step, demand, None, result.seconds)
            if cfg.placer.advise_mesh:  # this device's step time is not the advised mesh's: judge in model units
                self.replan.step_time_ema = None
        return result

    def parameter_counts(self) -> dict[str, int]:
        return count_parameters(self.model)

    def after_step(self, done: int) -> list[dict]:
        """Between-step work after `done` steps: in advisory mode, every placer.interval steps,
        the decision the placer would take (logged, nothing moves)."""
        if self.replan is None or not self.replan.due(done):
            return []
        decision = self.replan.propose(done, self._layout)
        advice = {}
        if decision.get("migrate"):  # the advised mesh's layout follows its own advice (nothing moves here)
            from moepipe.placement.plan import from_json

            self._layout = from_json(decision["plan"])
            advice = {"advised_stage_layers": [list(b) for b in self._layout.stage_layers],
                      "advised_replicas": sum(len(h) - 1 for holders in self._layout.expert_map.values() for h in holders)}
        self.replan.note_decision(done, decision)
        return [self.replan.event(done, decision, advisory=True) | advice]

    def placer_state(self) -> dict[str, torch.Tensor]:
        """The advisory loop's statistics (same keys as the distributed trainer's), for checkpoints."""
        if self.replan is None:
            return {}
        return {k: torch.from_numpy(np.array(v)) for k, v in self.replan.state_dict().items()}

    def load_placer_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.replan is not None:
            self.replan.load_state_dict(state)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for x, y in self.val_set:
            with self._autocast():
                losses.append(float(lm_loss(self.model(x.to(self.device)), y.to(self.device))))
        self.model.train()
        return float(np.mean(losses))


def train(cfg: MoepipeConfig, run_dir: str, trainer_factory=None, is_metrics_rank: bool = True) -> dict | None:
    """Train `cfg`, writing metrics.jsonl and summary.json into `run_dir` (metrics rank only).

    `trainer_factory(plan)` builds this process's trainer (default: the single-process `Trainer`;
    distributed workers pass one that builds a `DistributedTrainer`); `plan` is the checkpoint's
    plan when the run resumes under the same mesh and placer, else None (the default plan).
    Resumes per train.resume; checkpoints every train.ckpt_every steps and on SIGTERM (then
    raises `Preempted`). summary.json is written only when all train.steps are done.
    """
    if trainer_factory is None and world_size(cfg) != 1:
        raise ConfigError(
            f"parallel.pp*ep*dp*tp={world_size(cfg)}: train() alone runs one process; "
            "start multi-process runs with moepipe-train (it launches the workers)"
        )
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    point = find_resume(cfg, run_dir)  # ConfigError (missing/broken/mismatched) before any work
    logger, summary, exit_code = None, None, 1
    try:
        plan = plan_for_resume(point, cfg)
        trainer = trainer_factory(plan) if trainer_factory else Trainer(cfg)
        start = load_checkpoint(trainer, point, cfg) if point is not None else 0
        if point is not None and is_metrics_rank:
            trim_records(run_dir, start)  # only once the checkpoint loaded: rows past it are redone
        logger = MetricsLogger(cfg, run_dir, config_dict, enabled=is_metrics_rank)
        if point is not None:
            logger.event({"step": start, "event": "resume", "from": point.path, "plan": "kept" if plan is not None else "default"})
            if is_metrics_rank:
                print(f"moepipe: resumed from {point.path} (step {start})", file=sys.stderr, flush=True)
        note = single_process_placer_note(cfg) if trainer.world_size == 1 else None
        if note and is_metrics_rank:
            print(note, file=sys.stderr, flush=True)
        with StopOnSignal() as stop:
            summary = _loop(cfg, trainer, logger, run_dir, config_dict, start, stop)
        exit_code = 0
        return summary if is_metrics_rank else None
    except Preempted:
        exit_code = EXIT_PREEMPTED
        raise
    finally:
        if logger is not None:
            logger.close(summary, exit_code)


def trim_records(run_dir: str, step: int) -> None:
    """Drop rows after `step` (and a torn last line) from the run's jsonl files, so a resumed run
    leaves one consistent record instead of two versions of the steps it repeats."""
    for name in ("metrics.jsonl", "expert_load.jsonl"):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


# After this many non-finite steps in a row, train.on_nonfinite=skip gives up: the weights are
# damaged, not one batch.
MAX_CONSECUTIVE_SKIPS = 10


def _loop(cfg: MoepipeConfig, trainer, logger: MetricsLogger, run_dir: str, config_dict: dict, start: int, stop: StopOnSignal) -> dict:
    t = cfg.train
    rank = mesh_of(trainer)[0]
    root = checkpoint_root(cfg, run_dir)
    wall_start = time.perf_counter()
    window: list[StepResult] = []
    step_seconds, step_tokens = 0.0, 0
    val_loss, last, latest = None, None, None
    skipped, in_a_row = 0, 0
    replans: list[dict] = []
    seconds_of: dict[int, float] = {}  # step number (1-based) -> measured seconds, for the placement summary
    for step in range(start, t.steps):
        inject_sigterm(rank, step)
        try:
            res = trainer.train_step(step)
            in_a_row = 0
        except NonFiniteLossError as err:
            if t.on_nonfinite != "skip":
                raise
            skipped, in_a_row, res = skipped + 1, in_a_row + 1, None
            if in_a_row > MAX_CONSECUTIVE_SKIPS:
                raise NonFiniteLossError(f"{err} ({in_a_row} non-finite steps in a row, train.on_nonfinite=skip gives up)") from None
            logger.event({"step": step + 1, "event": "skipped", "reason": str(err)})
        advisory = []
        for event in trainer.after_step(step + 1):  # re-placement and migration events
            if event.get("advisory"):
                advisory.append(event)  # changes nothing about this step: logged after its row
            else:
                logger.event(event)
            if event.get("event") == "replan":
                replans.append(event)
        done = step + 1
        if res is not None:
            seconds_of[done] = res.seconds
            last = res
            window.append(res)
            if step > start or t.steps - start == 1:  # the first step pays one-off allocation costs
                step_seconds += res.seconds
                step_tokens += res.tokens
        is_eval = t.eval_every and done % t.eval_every == 0
        if is_eval or done == t.steps:
            val_loss = trainer.evaluate()
        if window and (done % t.log_every == 0 or done == t.steps):
            row = {
                "step": done,
                "loss": float(np.mean([r.loss for r in window])),
                "lr": window[-1].lr,
                "grad_norm": window[-1].grad_norm,
                "tokens_per_s": sum(r.tokens for r in window) / max(1e-9, sum(r.seconds for r in window)),
                **window[-1].routing,
            }
            if is_eval or done == t.steps:
                row["val_loss"] = val_loss
            logger.log(row, window[-1].expert_load)
            window = []
        elif is_eval or done == t.steps:
            logger.event({"step": done, "val_loss": val_loss})
        else:
            logger.tick(done)
        for event in advisory:
            logger.event(event)
        stopping = stop.agreed(trainer)
        if stopping or (t.ckpt_every and (done % t.ckpt_every == 0 or done == t.steps)):
            began = time.perf_counter()
            getattr(trainer, "drain_pipeline", lambda: None)()  # 2BW: a checkpoint holds no in-flight batch
            latest = save_checkpoint(trainer, cfg, root, done, config_dict)
            logger.event({"step": done, "event": "checkpoint", "path": latest, "seconds": time.perf_counter() - began})
        if stopping and done < t.steps:
            if logger.enabled:
                print(f"moepipe: stopped after step {done}/{t.steps}; checkpoint {latest}", file=sys.stderr, flush=True)
            raise Preempted(done, latest)
    if last is None:
        raise NonFiniteLossError(f"every step from {start} to {t.steps} was non-finite: lower optim.lr or raise optim.warmup_steps")
    params = trainer.parameter_counts()
    return {
        "steps": t.steps,
        "final_train_loss": last.loss,
        "final_val_loss": val_loss,
        "tokens_per_s": step_tokens / max(1e-9, step_seconds),
        "wall_time_s": time.perf_counter() - wall_start,
        "world_size": trainer.world_size,
        "device": str(trainer.device),
        "dtype": str(trainer.amp_dtype or torch.float32).replace("torch.", ""),
        "parameters": params,
        "run_dir": os.path.abspath(run_dir),
        "resumed_from_step": start,
        "restarts": attempt_number(),
        "skipped_steps": skipped,
        "checkpoint": latest,
        "pipeline_schedule": type(trainer.schedule).__name__ if getattr(trainer, "schedule", None) is not None else None,
        "placement": placement_summary(cfg, trainer, replans, seconds_of, start),
        **({"emulated_speed": trainer.speed} if cfg.workload.emulate_speed and trainer.world_size == 1 else {}),
        "config": config_dict,
        **run_info(),
    }


def _mean_seconds(seconds_of: dict[int, float], first: int, last: int) -> float | None:
    """Mean measured seconds of steps first..last (1-based, inclusive) that ran, or None."""
    vals = [v for k, v in seconds_of.items() if first <= k <= last]
    return float(np.mean(vals)) if vals else None


def _stage_layers(plan_json: str | None) -> list | None:
    return json.loads(plan_json)["stage_layers"] if plan_json else None


def _advisory_event(e: dict) -> dict:
    """One advisory decision for summary.json: what the placer would have done and why."""
    keys = ("step", "migrate", "reason", "predicted_old_s", "predicted_new_s", "expected_gain_s", "predicted_migration_s", "solve_s")
    advice = {k: e[k] for k in ("advised_stage_layers", "advised_replicas") if k in e}
    return {k: e.get(k) for k in keys} | advice


def placement_summary(cfg: MoepipeConfig, trainer, replans: list[dict], seconds_of: dict[int, float], start: int) -> dict:
    """What the placer did in this run: each re-plan (decision, reason, predicted step time of
    the old and new layout against the measured step time before and after it), migrations,
    bytes moved and seconds spent. Measured windows run from the previous re-plan (or the
    run's second step: the first pays one-off allocations) to the next one (or the end)."""
    pc = cfg.placer
    out: dict = {"placer": pc.name, "interval": pc.interval}
    if trainer.world_size == 1:
        note = single_process_placer_note(cfg)
        out |= {"mode": "advisory" if note else "fixed", "note": (note or "one process: one layout").removeprefix("moepipe (one process): ")}
        if not note:
            return out
        return out | {"replans": len(replans), "would_migrate": sum(bool(e.get("migrate")) for e in replans),
                      "advise_mesh": list(pc.advise_mesh) if pc.advise_mesh else [1, 1, 1],
                      "events": [_advisory_event(e) for e in replans]}
    if pc.interval <= 0:
        out |= {"mode": "fixed", "note": f"placer.interval={pc.interval}: the starting plan is kept"}
    else:
        out["mode"] = "replanning"
    steps = [e["step"] for e in replans]
    events = []
    for i, e in enumerate(replans):
        first = steps[i - 1] + 1 if i else (start + 2 if e["step"] > start + 1 else start + 1)  # skip the run's first step
        until = steps[i + 1] if i + 1 < len(steps) else cfg.train.steps
        events.append({
            "step": e["step"],
            "migrate": bool(e.get("migrate")),
            "reason": e.get("reason"),
            "predicted_old_s": e.get("predicted_old_s"),
            "predicted_new_s": e.get("predicted_new_s"),
            "measured_before_s": _mean_seconds(seconds_of, first, e["step"]),
            "measured_after_s": _mean_seconds(seconds_of, e["step"] + 1, until),
            "bytes_moved": int(e.get("bytes_moved", 0)),
            "migration_s": float(e.get("migration_s", 0.0)),
            "solve_s": float(e.get("solve_s", 0.0)),
            "stage_layers": _stage_layers(e.get("plan")) if e.get("migrate") else None,
        })
    moved = [e for e in events if e["migrate"]]
    plan = getattr(trainer, "plan", None)
    return out | {
        "replans": len(events),
        "migrations": len(moved),
        "bytes_moved": sum(e["bytes_moved"] for e in moved),
        "migration_s": sum(e["migration_s"] for e in moved),
        "solve_s": sum(e["solve_s"] for e in events),
        "final_stage_layers": [list(r) for r in plan.stage_layers] if plan is not None else None,
        "final_stage_to_pp_rank": list(plan.stage_to_pp_rank) if plan is not None else None,
        "events": events,
    }
