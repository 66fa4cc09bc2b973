"""Simulator fidelity (issue 4): predicted vs measured iteration time of real CPU runs.

For each schedule (gpipe, 1f1b, interleaved_1f1b, interleaved_zb, zbv, dualpipev; the last four
with virtual_stages=2) the `tiny` model trains at pp=2, ep=1, dp=1 on 2 gloo processes with
1 torch thread each (2 cores). Measured: the median `DistributedTrainer.train_step` seconds
after warmup (each step's time is the slower rank's). Predicted: `simulate()` with the cost
model calibrated from `measure_profile` (moepipe/train/profile.py), links from `probe_links`
on the real gloo group applied to the `local_cpu` topology (whose device throughput is set to
the profile's measured one, so calibrated times carry over unchanged), the routing counts the
profile measured, plus the per-step work the simulator does not model (optimizer step,
gradient bookkeeping, norm/clip, batch construction: `step_overhead` in the profile; and 3
small all_reduces timed on the group): prediction = iteration_time_s + that. The runtime's
own cost per action (schedule bookkeeping, sends/receives) comes from a "null step": the same
schedule on compute-free stand-in stages (`measure_schedule_overhead`), turned into a per-action
cost by `moepipe.sim.calibrate.fit_action_overhead` and given to `simulate(action_overhead_s=)`.
Links: the measured one-way time of the stage-boundary message (ping-pong of that tensor).
Profiles combine their repeats by the mean (`--statistic`): a step sums many actions.

Method (the 2 vCPUs are shared with other processes: their speed and our share of them drift
by tens of percent within minutes, and the two vCPUs differ): all six trainers live in the same
two processes, rank i pinned to core i (--no-pin to disable). R rounds; in each, for every
schedule (order rotated per round): `measure_profile` on both ranks at once (two busy cores, as
in the run), then the schedule's null step, then K steps of that schedule. A round's prediction uses the element-wise median
of the two ranks' profiles for per-part costs and each rank's own profile total for its
device's relative speed (topology `speed`). Reported: measured = median of the rounds'
median steps, predicted = median of the rounds' predictions, relative_error =
predicted / measured - 1, and paired = median over rounds of predicted/measured - 1 (each
prediction against the steps right after its profile: robust to drift between rounds).

Diagnostics (why a prediction is off): every stage's forward_one_chunk / backward_one_chunk /
backward_weight_one_chunk and the loss are timed inside the real runs ("measured action
durations", compared with the profile's), and the engine is replayed with those measured
durations ("replay": schedule order + engine + p2p, with measured compute).

    .venv/bin/python experiments/bench_sim.py                # writes results/bench_sim.json
    .venv/bin/python experiments/bench_sim.py --rounds 3 --steps 2 --schedules 1f1b zbv
    .venv/bin/python experiments/bench_sim.py --quick --out /tmp/x.json   # 1f1b and zbv, 1 round of 1 step, batch 4

The last line printed is `worst_relative_error=<x>`: max over schedules of |paired relative error|
(`worst_relative_error_unpaired` in the JSON uses predicted/measured - 1 of the medians; the line
before it prints both).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_runtime.py

import fig_common as fc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moepipe.parallel.spawn import run_distributed  # noqa: E402
from moepipe.train.metrics import write_json  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
BASE = ["model=tiny", "parallel=pp2", "train.seq_len=128", "train.dtype=fp32", "train.device=cpu", "train.num_threads=1",
        "train.steps=1000", "logger.progress=none"]


from moepipe.config import compose_config as compose  # noqa: E402


def overrides_for(name: str, args) -> list[str]:
    v = 1 if name in ("gpipe", "1f1b") else 2
    return BASE + [f"schedule={name}", f"schedule.virtual_stages={v}", f"schedule.microbatches={args.microbatches}",
                   f"train.batch_size={args.batch_size}", f"optim.lr={args.lr:g}"]


# ---------------------------------------------------------------------------- instrumentation


class ActionTimer:
    """Wall seconds of every compute action of a rank's stages (and the loss), per (stage, kind)."""

    def __init__(self):
        self.on = False
        self.t: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}  # thread CPU seconds of the same calls
        self.gaps: list[float] = []  # idle seconds between consecutive compute actions within a step
        self._c0: list[float] = []
        self._last_end: float | None = None

    def _add(self, key: str, dt: float) -> None:
        c = time.thread_time() - self._c0.pop()
        now = time.perf_counter()
        if self.on:
            self.t.setdefault(key, []).append(dt)
            self.cpu.setdefault(key, []).append(c)
            if key == "schedule.step":
                self._last_end = None
            elif not key.endswith("loss"):
                if self._last_end is not None:
                    self.gaps.append(now - dt - self._last_end)
                self._last_end = now

    def _timed(self, fn, label_of):
        """fn, timed: each call adds its wall time under label_of(*args, **kwargs) (None: not kept)."""

        def timed(*a, **k):
            self._c0.append(time.thread_time())
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                label = label_of(*a, **k)
                if label is not None:
                    self._add(label, time.perf_counter() - t0)

        return timed

    def wrap_stage(self, stage) -> None:
        s = stage.stage_index

        def backward_label(*a, **k):
            full = k.get("full_backward", a[2] if len(a) > 2 else True)
            return f"{s}{'B' if full else 'I'}"

        stage.forward_one_chunk = self._timed(stage.forward_one_chunk, lambda *a, **k: f"{s}F")
        stage.backward_one_chunk = self._timed(stage.backward_one_chunk, backward_label)
        stage.backward_weight_one_chunk = self._timed(stage.backward_weight_one_chunk, lambda *a, **k: f"{s}W")

    def wrap_schedule(self, sched) -> None:
        stages = getattr(sched, "_stages", None) or [sched._stage]
        for st in stages:
            self.wrap_stage(st)
        sched._maybe_compute_loss = self._timed(
            sched._maybe_compute_loss, lambda stage, *a, **k: f"{stage.stage_index}loss" if stage.is_last else None
        )
        sched.step = self._timed(sched.step, lambda *a, **k: "schedule.step")


# ---------------------------------------------------------------------------- worker


def worker(rank: int, world: int, cfgs: dict, base_cfg, args, out_path: str) -> None:
    from moepipe.parallel.mesh import build_mesh
    from moepipe.placement.topology import probe_links
    from moepipe.train.distributed import DistributedTrainer
    from moepipe.train.profile import measure_profile, measure_schedule_overhead

    if args.pin:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})
    mesh = build_mesh(2, 1, 1)
    trainers, timers = {}, {}
    for name, cfg in cfgs.items():
        trainers[name] = DistributedTrainer(cfg, mesh)
        timers[name] = ActionTimer()
        timers[name].wrap_schedule(trainers[name].schedule)

    probe = probe_links(mesh.pp_group, iters=args.probe_iters)
    # The stage-boundary message itself (one microbatch's activations), ping-ponged: its one-way
    # time is what every transfer of the run costs; a two-size fit on a busy machine can come
    # out with an absurd latency/bandwidth split.
    cfg0 = next(iter(cfgs.values()))
    act = torch.zeros(cfg0.train.batch_size // cfg0.schedule.microbatches, cfg0.train.seq_len, cfg0.model.d_model)
    rtt = []
    for i in range(args.probe_iters + 3):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            dist.send(act, 1)
            dist.recv(act, 1)
        else:
            dist.recv(act, 0)
            dist.send(act, 0)
        if i >= 3:
            rtt.append(time.perf_counter() - t0)
    probe["activation_one_way_s"] = statistics.median(rtt) / 2
    probe["activation_bytes"] = act.numel() * act.element_size()
    small = torch.zeros(4)
    for _ in range(5):
        dist.all_reduce(small)
    ar = []
    for _ in range(30):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(small)
        ar.append(time.perf_counter() - t0)

    next_step = {n: 0 for n in trainers}

    def step(name: str) -> float:
        res = trainers[name].train_step(next_step[name])
        next_step[name] += 1
        return res.seconds

    for name in trainers:  # warmup: first-step set-up (p2p connections, buffers, optimizer state)
        for _ in range(args.warmup):
            step(name)

    # Per-step work outside the pipeline: measured once (it does not depend on the schedule).
    # More repeats than the per-round profiles: a single spell of preemption would otherwise stick.
    overhead = measure_profile(base_cfg, threads=1, repeats=max(7, args.profile_repeats), warmup=1)["step_overhead"]
    rounds = []
    names = list(trainers)
    for r in range(args.rounds):
        entry = {}
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotated order
            # A profile right before the steps it predicts: the cores' speed and our share of
            # them drift by tens of percent within minutes when other processes run.
            dist.barrier()
            prof = measure_profile(cfgs[name], threads=1, repeats=args.profile_repeats, warmup=1, step_overhead=False,
                                   statistic=args.statistic)
            prof["step_overhead"] = overhead
            # the runtime's cost besides compute: the same schedule on compute-free stand-in stages
            null_cpu: list[float] = []
            null_steps = measure_schedule_overhead(cfgs[name], mesh.pp_group, steps=args.null_steps, warmup=1, threads=1, cpu=null_cpu)
            timer = timers[name]
            timer.t, timer.cpu, timer.gaps, timer._last_end = {}, {}, [], None
            dist.barrier()
            timer.on = True
            secs = [step(name) for _ in range(args.steps)]
            timer.on = False
            entry[name] = {"profile": prof, "secs": secs, "actions": timer.t, "actions_cpu": timer.cpu, "gaps": timer.gaps,
                           "null_steps": null_steps, "null_comm_cpu": null_cpu}
        rounds.append(entry)

    mine = {"rank": rank, "rounds": rounds, "probe": probe, "allreduce_s": statistics.median(ar), "step_overhead": overhead}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)


# ---------------------------------------------------------------------------- prediction


def profile_seconds(p: dict) -> float:
    """Seconds of one microbatch through the whole model (forward + fused backward) in a profile."""
    d = p["backward_detail"]
    per_mb = p["routing_tokens"] / p["tokens_per_microbatch"]
    t = sum(d[k]["fwd_s"] + d[k]["bwd_fused_s"] for k in ("embedding", "head"))
    t += sum(v["fwd_s"] + v["bwd_fused_s"] for v in d["layers"].values())
    t += sum((v["fwd_s"] + v["bwd_fused_s"]) * sum(p["routing"][l]) / per_mb for l, v in d["expert_per_token_s"].items())
    return t


def median_tree(trees: list):
    """Element-wise median of identically shaped JSON trees (numbers; other leaves from the first)."""
    t0 = trees[0]
    if isinstance(t0, dict):
        return {k: median_tree([t[k] for t in trees]) for k in t0}
    if isinstance(t0, list):
        return [median_tree([t[i] for t in trees]) for i in range(len(t0))]
    if isinstance(t0, (int, float)) and not isinstance(t0, bool):
        v = float(statistics.median(trees))
        return int(v) if isinstance(t0, int) else v
    return t0


def topology_for(cfg, profile: dict, probe: dict | None, speed: list[float] | None = None):
    """local_cpu with the profile's measured device throughput (optionally a relative speed per
    rank); links from the probe if given."""
    from moepipe.placement.topology import apply_probe, from_config

    tc = asdict(cfg.topology)
    n = sum(g["count"] for g in tc["device_groups"])
    speed = list(speed or []) + [1.0] * (n - len(speed or []))
    base = dict(tc["device_groups"][0], tflops=profile["device"]["tflops"])
    tc["device_groups"] = [dict(base, count=1, speed=profile["device"].get("speed", 1.0) * sp) for sp in speed]
    topo = from_config(tc, 2)
    return apply_probe(topo, probe) if probe is not None else topo


def predict(cfg, profile: dict, probe: dict | None, allreduce_s: float, speed: list[float] | None = None,
            null_step_s: float | None = None, comm_cpu_s: list[float] | None = None) -> dict:
    """Simulated iteration + per-step overhead. `null_step_s`: measured schedule step on compute-free
    stages (measure_schedule_overhead), calibrating the engine's per-action runtime cost; None: no such cost.
    `comm_cpu_s`: per rank, CPU seconds per step of the communication threads in the null step (they share
    the rank's one core with compute here), spread over the rank's actions."""
    from moepipe.placement.cost_model import CostModel, stage_costs
    from moepipe.sim.calibrate import comm_cpu_per_action, fit_action_overhead
    from moepipe.placement.model_spec import build_model_spec
    from moepipe.sim.simulator import simulate
    from moepipe.train.distributed import default_plan
    from moepipe.train.profile import profile_for, step_overhead_s

    prof = profile_for(profile, cfg)
    spec = build_model_spec(cfg.model, cfg.moe, cfg.train, cfg.schedule.microbatches, cfg.parallel.dp, dtype_bytes=4)
    cm = CostModel(spec, efficiency=cfg.sim.efficiency, profile=prof)
    plan = default_plan(cfg)
    topo = topology_for(cfg, prof, probe, speed)
    routing = {int(k): v for k, v in prof["routing"].items()}
    o = 0.0
    if null_step_s is not None:
        send = stage_costs(cm, plan, topo, routing).send
        o = fit_action_overhead(cfg.schedule.name, plan.pp, plan.n_stages // plan.pp, cfg.schedule.microbatches, null_step_s, send=send)
    if comm_cpu_s is not None:
        o = np.asarray(comm_cpu_per_action(cfg.schedule.name, plan.pp, plan.n_stages // plan.pp, cfg.schedule.microbatches, comm_cpu_s)) + o
    res = simulate(plan, cfg.schedule.name, cfg.schedule.microbatches, topo, cm, routing, action_overhead_s=o)
    # the null step already contains the last stage's output merge
    over = step_overhead_s(prof, plan, allreduce_s, merge=null_step_s is None)
    return {"sim": res, "plan": plan, "costs": res.costs, "step_overhead_s": over, "predicted_s": res.iteration_time_s + over,
            "profile": prof, "action_overhead_s": float(np.max(o))}


def replay(name: str, cfg, plan, costs, measured_actions: dict[str, float]) -> tuple[float, np.ndarray]:
    """Engine makespan with the measured median duration of every (stage, kind) action."""
    from moepipe.sim.schedules import schedule_order
    from moepipe.sim.simulator import simulate_order

    order, s2r = schedule_order(name, plan.pp, plan.n_stages // plan.pp, cfg.schedule.microbatches)
    S = plan.n_stages
    comp = np.zeros((S, 3))
    for s in range(S):
        f = measured_actions.get(f"{s}F", 0.0) + measured_actions.get(f"{s}loss", 0.0)
        if f"{s}I" in measured_actions:
            b, w = measured_actions[f"{s}I"], measured_actions.get(f"{s}W", 0.0)
            if f"{s}B" in measured_actions:  # both kinds in one order (dualpipev): B = I + W must hold
                full = measured_actions[f"{s}B"]
                b, w = full * b / max(b + w, 1e-12), full * w / max(b + w, 1e-12)
        else:
            b, w = measured_actions.get(f"{s}B", 0.0), 0.0
        comp[s] = (f, b, w)
    return float(simulate_order(order, s2r, cfg.schedule.microbatches, comp, None, costs.send).makespan), comp


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per schedule per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per schedule first")
    ap.add_argument("--profile-repeats", type=int, default=3, help="measure_profile repeats (one profile per schedule per round)")
    ap.add_argument("--statistic", default="mean", choices=("mean", "median"),
                    help="how measure_profile combines its repeats (mean: a step sums many actions whose durations have a long tail here)")
    ap.add_argument("--null-steps", type=int, default=3, help="timed steps of the schedule on compute-free stages (per schedule per round)")
    ap.add_argument("--probe-iters", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-12,
                    help="default 1e-12: fp32 updates round away, so the weights (and routing) the profile measured stay those of every step")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin rank i to core i (pinned by default: a rank's profile then measures the core it runs on, and "
                         "the scheduler cannot stack both ranks on one core after a wake-up)")
    ap.add_argument("--no-probe", action="store_true", help="use local_cpu's nominal links instead of probe_links")
    fc.add_output_args(ap, os.path.join(ROOT, "results", "bench_sim.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.schedules, args.rounds, args.steps, args.warmup = ["1f1b", "zbv"], 1, 1, 1
        args.profile_repeats, args.null_steps, args.probe_iters, args.batch_size, args.microbatches = 1, 1, 2, 4, 2
    return args


def measure(args, cfgs: dict) -> tuple[list[dict], tuple, tuple]:
    """Run both ranks (probe, then per round and schedule: profile, steps, null steps); (per-rank
    records, load average before, after)."""
    base_cfg = compose(overrides_for("1f1b", args))
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ranks.json")
        run_distributed(worker, 2, cfgs, base_cfg, args, path, timeout=900.0, threads=1)
        with open(path) as f:
            ranks = json.load(f)
    return ranks, load_before, os.getloadavg()


def link_model(ranks: list[dict], no_probe: bool) -> tuple[dict | None, float]:
    """(probed links for the topology, or None for local_cpu's nominal ones; the slower rank's small all_reduce)."""
    probe = None if no_probe else median_tree([r["probe"] for r in ranks])
    if probe is not None:  # links: the measured one-way time of the stage-boundary message, all of it latency
        fitted = {k: probe[k] for k in ("latency_us", "bandwidth_gbps")}
        one_way = max(r["probe"]["activation_one_way_s"] for r in ranks)
        probe["fitted_by_probe_links"] = fitted
        probe["latency_us"] = [[0.0 if i == j else 1e6 * one_way for j in range(2)] for i in range(2)]
        probe["bandwidth_gbps"] = [[float("inf") if i == j else 1e12 for j in range(2)] for i in range(2)]  # size already in the latency
    return probe, max(r["allreduce_s"] for r in ranks)


def round_row(name: str, cfg, runs: list[dict], probe: dict | None, allreduce_s: float) -> tuple[dict, dict]:
    """One round of one schedule (`runs`: both ranks' records): its predictions beside what was
    measured, and the round's median profile."""
    # Both ranks measured at once, each on its own core: the median profile gives the
    # per-part costs, each rank's own total its device's relative speed (the two vCPUs
    # of this VM run at visibly different speeds).
    rank_profiles = [x["profile"] for x in runs]
    prof = median_tree(rank_profiles)
    speed = [profile_seconds(prof) / profile_seconds(rp) for rp in rank_profiles]
    steps = [max(x["secs"][j] for x in runs) for j in range(len(runs[0]["secs"]))]  # the slower rank's
    null = statistics.median(max(t) for t in zip(*(x["null_steps"] for x in runs)))
    ccpu = [statistics.median(x["null_comm_cpu"]) for x in runs]
    p = predict(cfg, prof, probe, allreduce_s, speed=speed, null_step_s=null, comm_cpu_s=ccpu)
    p_one = predict(cfg, prof, probe, allreduce_s, null_step_s=null, comm_cpu_s=ccpu)
    p_ideal = predict(cfg, prof, probe, allreduce_s, speed=speed)  # without the runtime's per-action cost
    # load-corrected (diagnostic, uses the run): speed x CPU share the rank's actions got / its profile's share
    share = [sum(sum(v) for k, v in x["actions_cpu"].items() if k != "schedule.step")
             / sum(sum(v) for k, v in x["actions"].items() if k != "schedule.step") for x in runs]
    pc = predict(cfg, prof, probe, allreduce_s, speed=[sp * sh / rp["meta"]["cpu_share"] for sp, sh, rp in zip(speed, share, rank_profiles)],
                 null_step_s=null, comm_cpu_s=ccpu)
    acts = {k: statistics.median(v) for x in runs for k, v in x["actions"].items() if k != "schedule.step"}
    sched = statistics.median(max(a, b) for a, b in zip(runs[0]["actions"]["schedule.step"], runs[1]["actions"]["schedule.step"]))
    rep, comp_meas = replay(name, cfg, p["plan"], p["costs"], acts)
    acts_mean = {k: statistics.fmean(v) for x in runs for k, v in x["actions"].items() if k != "schedule.step"}
    rep_mean, _ = replay(name, cfg, p["plan"], p["costs"], acts_mean)
    wall = sum(sum(v) for x in runs for k, v in x["actions"].items() if k != "schedule.step")
    cpu = sum(sum(v) for x in runs for k, v in x["actions_cpu"].items() if k != "schedule.step")
    # runtime cost per action the engine does not model: the median idle gap between two
    # consecutive compute actions of a rank (most gaps are not waits for a peer), x actions per step
    n_act = [sum(len(v) for k, v in x["actions"].items() if k != "schedule.step" and not k.endswith("loss")) / len(x["secs"]) for x in runs]
    gap = statistics.median(g for x in runs for g in x["gaps"])
    row = {
        "median_action_gap_s": gap, "actions_per_rank_per_step": n_act,
        "predicted_with_action_gaps_s": p["predicted_s"] + gap * max(n_act),
        "measured_s": statistics.median(steps), "steps_s": steps, "predicted_s": p["predicted_s"],
        "predicted_pipeline_s": p["sim"].pipeline_time_s, "step_overhead_s": p["step_overhead_s"],
        "device_speed_per_rank": speed, "predicted_one_speed_s": p_one["predicted_s"],
        "null_step_s": null, "null_comm_cpu_s": ccpu, "action_overhead_s": p["action_overhead_s"], "predicted_no_action_overhead_s": p_ideal["predicted_s"],
        "schedule_step_s": sched, "replay_pipeline_s": rep, "replay_mean_pipeline_s": rep_mean,
        "stage_pred_s": p["costs"].comp.tolist(), "stage_meas_s": comp_meas.tolist(),
        "action_cpu_over_wall": cpu / wall, "action_cpu_share_per_rank": share,
        "profile_cpu_share_per_rank": [rp["meta"]["cpu_share"] for rp in rank_profiles], "predicted_load_corrected_s": pc["predicted_s"],
    }
    return row, prof


def schedule_row(cfg, per_round: list[dict], slot_profiles: list[dict], probe: dict | None,
                 allreduce_s: float) -> tuple[dict, dict]:
    """A schedule's row over its rounds (medians, paired errors) and the profile stored for it."""
    med = lambda key: statistics.median(x[key] for x in per_round)  # noqa: E731
    # The profile stored (and the stage costs shown): element-wise median over rounds, median speeds.
    profile = median_tree(slot_profiles)
    profile["device_speed_per_rank"] = median_tree([x["device_speed_per_rank"] for x in per_round])
    p = predict(cfg, profile, probe, allreduce_s, speed=profile["device_speed_per_rank"], null_step_s=med("null_step_s"),
                comm_cpu_s=median_tree([x["null_comm_cpu_s"] for x in per_round]))
    measured, predicted = med("measured_s"), med("predicted_s")
    c = p["costs"]
    row = {
        "measured_s": measured,
        "predicted_s": predicted,
        "relative_error": predicted / measured - 1.0,
        "paired_relative_error": statistics.median(x["predicted_s"] / x["measured_s"] for x in per_round) - 1.0,
        "with_action_gaps_relative_error": statistics.median(x["predicted_with_action_gaps_s"] / x["measured_s"] for x in per_round) - 1.0,
        "median_action_gap_s": med("median_action_gap_s"),
        "null_step_s": med("null_step_s"),
        "action_overhead_s": med("action_overhead_s"),
        "no_action_overhead_relative_error": statistics.median(x["predicted_no_action_overhead_s"] / x["measured_s"] for x in per_round) - 1.0,
        "one_speed_relative_error": statistics.median(x["predicted_one_speed_s"] / x["measured_s"] for x in per_round) - 1.0,
        "load_corrected_relative_error": statistics.median(x["predicted_load_corrected_s"] / x["measured_s"] for x in per_round) - 1.0,
        "predicted_pipeline_s": med("predicted_pipeline_s"),
        "predicted_grad_sync_s": p["sim"].grad_sync_s,
        "predicted_step_overhead_s": p["step_overhead_s"],
        "measured_schedule_step_s": med("schedule_step_s"),
        "replay_pipeline_s": med("replay_pipeline_s"),
        "replay_mean_pipeline_s": med("replay_mean_pipeline_s"),
        "stage_costs_predicted_s": {"F": c.comp[:, 0].tolist(), "B": c.comp[:, 1].tolist(), "W": c.comp[:, 2].tolist(), "send": c.send.tolist()},
        "stage_costs_measured_s": np.median(np.array([x["stage_meas_s"] for x in per_round]), axis=0).tolist(),
        "bubble_fraction_predicted": p["sim"].bubble_fraction,
        "stage_to_pp_rank": p["sim"].stage_to_pp_rank,
        "backward": p["profile"]["meta"]["backward"],
        "rounds": per_round,
    }
    return row, profile


def summarise(args, rows: dict, probe: dict | None, allreduce_s: float, profiles_used: dict, loads: tuple, info: dict,
              t_start: float) -> dict:
    """The results JSON."""
    load_before, load_after = loads
    worst = max(abs(r["paired_relative_error"]) for r in rows.values())
    result = {
        "worst_relative_error": worst,
        "worst_relative_error_unpaired": max(abs(r["relative_error"]) for r in rows.values()),
        "rows": rows,
        "config": {"overrides": {n: overrides_for(n, args) for n in args.schedules}, "args": vars(args), "world": 2, "threads_per_rank": 1,
                   "topology": "local_cpu (device tflops := profile's measured) + probe_links" if probe else "local_cpu (device tflops := profile's)"},
        "probe": probe,
        "allreduce_small_s": allreduce_s,
        "profiles": profiles_used,
        "method": {"measured": "median over rounds of the median over a round's K steps of the slower rank's StepResult.seconds",
                   "pinned": args.pin, "worst_relative_error": "max over schedules of |paired_relative_error|",
                   "predicted": "median over rounds of simulate(..., action_overhead_s=o).iteration_time_s + step_overhead_s(profile, plan, "
                                "allreduce_s, merge=False); o = fit_action_overhead(schedule, null step): the per-action cost for which the engine "
                                "reproduces the round's median null step (the same schedule on compute-free stand-in stages, slower rank), plus per "
                                "rank comm_cpu_per_action (the comm threads' CPU per null step over the rank's actions: they share its core); each "
                                "round's profile = element-wise median of both ranks' (measured at once right before that schedule's steps), "
                                "device speed of rank r = profile_seconds(median) / profile_seconds(rank r's)",
                   "no_action_overhead": "the same with o = 0 and the output merge in step_overhead_s (the model before the null step)",
                   "profile_statistic": args.statistic,
                   "one_speed": "the same with both devices at the median profile's speed",
                   "load_corrected": "diagnostic using the run: device speed also x (CPU share of the rank's actions / its profile's CPU share)",
                   "paired": "median over rounds of predicted(round's profile) / measured(round) - 1",
                   "replay": "engine.run with measured per-(stage, kind) median (replay_mean: mean) action durations and the model's send times",
                   "action_gaps": "+gaps: prediction + median idle gap between consecutive actions of a rank x actions per rank (the runtime's "
                                  "per-action cost, which the engine does not model; measured in the run: diagnostic)"},
        "loadavg_before_after": [list(load_before), list(load_after)],
        "wall_s": time.perf_counter() - t_start,
        "provenance": info,
    }
    return result


def print_table(out: str, rows: dict, probe: dict | None, allreduce_s: float, loads: tuple, result: dict) -> None:
    load_before, load_after = loads
    worst = result["worst_relative_error"]
    print(f"{'schedule':<17} {'measured':>9} {'predicted':>9} {'rel.err':>8} {'paired':>7} {'no_ovh':>7} {'ovh_ms':>6} {'1speed':>7} {'loadcorr':>8} {'pipe(sim)':>9} {'overhead':>8} {'sched.step':>10} {'replay':>8} {'replay_mean':>11}")
    for name, r in rows.items():
        print(f"{name:<17} {r['measured_s']:>9.4f} {r['predicted_s']:>9.4f} {r['relative_error']:>+8.3f} {r['paired_relative_error']:>+7.3f} "
              f"{r['no_action_overhead_relative_error']:>+7.3f} {1e3 * r['action_overhead_s']:>6.2f} "
              f"{r['one_speed_relative_error']:>+7.3f} {r['load_corrected_relative_error']:>+8.3f} "
              f"{r['predicted_pipeline_s']:>9.4f} {r['predicted_step_overhead_s']:>8.4f} {r['measured_schedule_step_s']:>10.4f} {r['replay_pipeline_s']:>8.4f} {r['replay_mean_pipeline_s']:>11.4f}")
    link = f"activation transfer {probe['latency_us'][0][1]:.0f} us one way" if probe else "local_cpu nominal links"
    print(f"links: {link}; small all_reduce {1e6 * allreduce_s:.0f} us; loadavg {load_before[0]:.1f}->{load_after[0]:.1f}; wall {result['wall_s']:.0f} s")
    print(f"wrote {out}")
    print(f"worst relative error over {len(rows)} schedules: paired {worst:.4f}, unpaired {result['worst_relative_error_unpaired']:.4f}")
    print(f"worst_relative_error={worst:.4f}")


def main() -> None:
    args = parse_args()
    args.out = fc.check_output(args)
    info = fc.provenance(args, {n: overrides_for(n, args) for n in args.schedules})
    t_start = time.perf_counter()
    cfgs = {n: compose(overrides_for(n, args)) for n in args.schedules}
    ranks, load_before, load_after = measure(args, cfgs)
    probe, allreduce_s = link_model(ranks, args.no_probe)

    rows, profiles_used = {}, {}
    for name in args.schedules:
        per_round, slot_profiles = [], []
        for i in range(args.rounds):
            row, prof = round_row(name, cfgs[name], [r["rounds"][i][name] for r in ranks], probe, allreduce_s)
            per_round.append(row)
            slot_profiles.append(prof)
        rows[name], profiles_used[name] = schedule_row(cfgs[name], per_round, slot_profiles, probe, allreduce_s)
    result = summarise(args, rows, probe, allreduce_s, profiles_used, (load_before, load_after), info, t_start)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, result)
    print_table(args.out, rows, probe, allreduce_s, (load_before, load_after), result)



if __name__ == "__main__":
    main()
