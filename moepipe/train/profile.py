"""Measure what the simulator's calibrated cost model needs, in one process (no process group).

`measure_profile(cfg)` times, on this machine with the threads and microbatch shape the run
will use, one microbatch through every part of the model and returns the profile JSON of
docs/SIMULATOR.md ("Profile JSON"), which `CostModel(spec, profile=...)` accepts as is:

* `layers[i]`: the non-expert part of block i (norms, attention, router, top-k, token
  gather/weighting/scatter, shared experts or the dense FFN) = whole block minus its routed
  experts, paired per repetition;
* `expert_per_token_s[i]`: the routed experts of block i on the routing the real router
  produced, divided by the number of token-expert assignments;
* `embedding`, `head` (final norm + output projection + the loss the schedule computes);
* `routing[i]`: tokens per expert (demand, before any capacity cap) of MoE block i over all
  `routing_tokens` tokens of the rank's first-step batch slice: they sum to routing_tokens * top_k.

Backward is timed three ways, with the functions torch.distributed.pipelining itself runs:
fused (`stage_backward`: 1F1B, GPipe, interleaved 1F1B, DualPipeV's B), and split into
input-grad (`stage_backward_input`) and weight-grad (`stage_backward_weight`) as the
zero-bubble schedules run them. The split costs more than the fused pass (two graph walks).
The profile format has one (B, W) pair per part, so `profile_for(detail, cfg)` picks:
* schedules whose backward is all I/W (interleaved_zb, zbv): the split times; and torch's rule
  for the first stage (its I is empty, its W runs the whole fused backward) for the embedding
  and the blocks of stage 0 of the run's static plan;
* the others: the fused time, divided into B and W in the measured split's ratio.
All three are kept under `backward_detail`, so a profile can be re-targeted to another schedule
(`profile_for(profile, other_cfg)`).

Extra keys the cost model ignores: `meta` (shapes, threads, repetitions, `cpu_share` = thread CPU /
wall of the timed calls: below 1 when other processes shared the core), `backward_detail`,
`step_overhead` (per-step work outside the pipeline, which the simulator does not model:
gradient bookkeeping + norm + clip + AdamW step per part, batch construction, the last
stage's output merge; see `step_overhead_s`).

Timing: `time.perf_counter` around each call (CUDA synchronised when on GPU), `warmup`
untimed repetitions first (allocations, optimizer state, lazy init), then the median of
`repeats`. Microbatches cycle over the rank's real first batch, so routing is the real one.
A model passed in is left as it was (weights, gradients, routing counters, RNG state).
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from moepipe.config import MoepipeConfig, moe_layer_ids, world_size

PROFILE_VERSION = 1
SPLIT_SCHEDULES = ("interleaved_zb", "zbv")  # every backward runs as I + W
STEP_COLLECTIVES = 3  # DistributedTrainer.train_step: loss, grad-norm and routing-stat all_reduces


def default_threads(cfg: MoepipeConfig) -> int:
    """Intra-op threads one rank of this run uses: train.num_threads, else the cores this
    process may use shared evenly by the ranks of the job (one node assumed)."""
    if cfg.train.num_threads:
        return int(cfg.train.num_threads)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, world_size(cfg)))


def microbatch_shape(cfg: MoepipeConfig) -> tuple[int, int]:
    """(sequences, seq_len) of one microbatch on one rank, as DistributedTrainer splits it."""
    slices = cfg.parallel.ep * cfg.parallel.dp
    b = cfg.train.batch_size // (slices * cfg.schedule.microbatches)
    if b < 1:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} < ep*dp*microbatches={slices * cfg.schedule.microbatches}: nothing to profile")
    return b, cfg.train.seq_len


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else 0.0


STATISTICS = {"median": _median, "mean": _mean}


class _Clock:
    """Wall seconds of a call (CUDA synchronised); also sums the calling thread's CPU seconds
    against wall seconds, so the profile can say what share of a core it got (other
    processes on the cores stretch wall times)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.wall = self.cpu = 0.0

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        c0, t0 = time.thread_time(), time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.wall += dt
        self.cpu += time.thread_time() - c0
        return dt, out


def measure_tflops(device: torch.device, n: int = 512, repeats: int = 5) -> float:
    """Sustained fp32 matmul TFLOP/s of this process (n x n x n), for the profile's device entry."""
    clock = _Clock(device)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    t = _median([clock(lambda: a @ b)[0] for _ in range(repeats)])
    return 2.0 * n**3 / max(t, 1e-12) / 1e12


def first_stage_layers(cfg: MoepipeConfig) -> list[int]:
    """Blocks of stage 0 in the run's static plan (they share torch's first-stage backward rule)."""
    from moepipe.placement.plan import static_plan
    from moepipe.sim.schedules import plan_style

    p = static_plan(cfg.model.n_layers, moe_layer_ids(cfg.model, cfg.moe), cfg.moe.num_experts, cfg.parallel.pp, cfg.parallel.ep,
                    cfg.schedule.virtual_stages, plan_style(cfg.schedule.name), cfg.parallel.dp)
    a, b = p.stage_layers[0]
    return list(range(a, b))


def _entry(fwd: float, fused: float, inp: float, wgt: float, split: bool, first_stage: bool) -> dict[str, float]:
    """{fwd_s, bwd_input_s, bwd_weight_s} for one part under the schedule's backward style."""
    if split:
        if first_stage:  # torch: stage 0's I does nothing, its W runs the full backward
            return {"fwd_s": fwd, "bwd_input_s": 0.0, "bwd_weight_s": fused}
        return {"fwd_s": fwd, "bwd_input_s": inp, "bwd_weight_s": wgt}
    frac = inp / (inp + wgt) if inp + wgt > 0 else 0.5
    return {"fwd_s": fwd, "bwd_input_s": fused * frac, "bwd_weight_s": fused * (1 - frac)}


def profile_for(profile: Mapping[str, Any], cfg: MoepipeConfig, split_backward: Optional[bool] = None) -> dict:
    """The profile's cost-model entries rebuilt for `cfg`'s schedule (from `backward_detail`).

    `split_backward`: None picks by schedule name (SPLIT_SCHEDULES use the I/W split times).
    """
    out = copy.deepcopy(dict(profile))
    det = out["backward_detail"]
    split = cfg.schedule.name in SPLIT_SCHEDULES if split_backward is None else bool(split_backward)
    first = set(first_stage_layers(cfg)) if split else set()

    def ent(d: Mapping[str, float], is_first: bool) -> dict[str, float]:
        return _entry(d["fwd_s"], d["bwd_fused_s"], d["bwd_input_s"], d["bwd_weight_s"], split, is_first)

    out["layers"] = {k: ent(d, int(k) in first) for k, d in det["layers"].items()}
    out["expert_per_token_s"] = {k: ent(d, int(k) in first) for k, d in det["expert_per_token_s"].items()}
    out["embedding"] = ent(det["embedding"], True)  # no input gradient: all of its backward is W
    out["head"] = ent(det["head"], False)
    out["meta"] = dict(out["meta"], schedule=cfg.schedule.name, backward="split" if split else "fused",
                       first_stage_layers=sorted(first))
    return out


# ------------------------------------------------------------------ measurement


class _Recorder:
    """Per-part lists of samples; medians at the end."""

    def __init__(self, stat: Callable[[list[float]], float] = _median):
        self.s: dict[str, dict[str, list[float]]] = {}
        self.stat = stat

    def add(self, part: str, key: str, t: float) -> None:
        self.s.setdefault(part, {}).setdefault(key, []).append(t)

    def med(self, part: str) -> dict[str, float]:
        return {k: self.stat(v) for k, v in self.s.get(part, {}).items()}


def _time_backward(clock: _Clock, fwd: Callable[[], tuple[torch.Tensor, list]], grad: Optional[torch.Tensor], params: list[nn.Parameter],
                   rec: _Recorder, part: str, timed: bool) -> None:
    """Forward, fused backward; forward again, split backward (input, then weight), as torch runs them."""
    from torch.distributed.pipelining._backward import stage_backward, stage_backward_input, stage_backward_weight

    for mode in ("fused", "split"):
        t_f, (out, inputs) = clock(fwd)
        outs = [out]
        grads = None if grad is None else [grad]  # None: `out` is the loss (last stage)
        if mode == "fused":
            t_b, _ = clock(lambda: stage_backward(out if grad is None else outs, None if grad is None else grads, inputs))
            if timed:
                rec.add(part, "fwd_s", t_f)
                rec.add(part, "bwd_fused_s", t_b)
        else:
            t_i, (_, groups) = clock(lambda: stage_backward_input(outs, grads, inputs, iter(params)))
            t_w, _ = clock(lambda: stage_backward_weight(iter(params), groups))
            if timed:
                rec.add(part, "fwd_s", t_f)
                rec.add(part, "bwd_input_s", t_i)
                rec.add(part, "bwd_weight_s", t_w)


def measure_profile(
    cfg: MoepipeConfig,
    model: Optional[nn.Module] = None,
    threads: Optional[int] = None,
    repeats: int = 5,
    warmup: int = 2,
    step: int = 0,
    split_backward: Optional[bool] = None,
    step_overhead: bool = True,
    statistic: str = "median",
) -> dict:
    """Profile JSON (docs/SIMULATOR.md) of `cfg`'s model on this process's device.

    `model`: the run's own model (left unchanged), else one is built from cfg (same seed, so
    the same weights as the run's). `threads`: intra-op threads during the measurement
    (default `default_threads(cfg)`; restored afterwards). Microbatch shape: the run's
    (`microbatch_shape`). `step`: whose batch feeds the measurement. `split_backward`: see
    `profile_for`. `step_overhead`: also time the per-step work outside the pipeline.
    `statistic`: how repeats combine, "median" (robust to a slow spell) or "mean" (what a run
    of many actions adds up to when durations have a long tail, as on a shared machine).
    """
    from moepipe.model import build_model
    from moepipe.train.loop import autocast_dtype, resolve_device

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r} is not one of {sorted(STATISTICS)}")
    stat = STATISTICS[statistic]
    device = resolve_device(cfg)
    amp = autocast_dtype(cfg, device)
    threads = default_threads(cfg) if threads is None else int(threads)
    b, seq = microbatch_shape(cfg)
    m = cfg.schedule.microbatches
    slices = cfg.parallel.ep * cfg.parallel.dp
    clock = _Clock(device)

    with _measuring(model, lambda: build_model(cfg.model, cfg.moe, cfg.train.seed).to(device), threads) as model:
        ctx = _autocast_wrapper(device, amp)
        t_batch, xs, ys = _first_batch(cfg, clock, step, seq, slices, m, warmup + repeats, warmup, device)
        moe_ids = moe_layer_ids(cfg.model, cfg.moe)
        counts, h_in, h_out = _block_inputs(model, xs, ctx, moe_ids, cfg.moe.num_experts)
        gen = torch.Generator().manual_seed(1234)
        g_hidden = [(torch.randn(h.shape, generator=gen) * 1e-3).to(device=device, dtype=h.dtype) for h in h_out]
        timer = _PartTimer(model, clock, _Recorder(stat), ctx, xs, ys, h_in, h_out, g_hidden, gen, warmup, m, device)
        # Repetitions outermost: a slow spell (other processes on the cores) hits every part alike.
        for r in range(warmup + repeats):
            timer.embedding(r)
            for li in range(len(timer.blocks)):
                timer.block(li, r)
            timer.head(r)

        prof: dict[str, Any] = {
            "version": PROFILE_VERSION,
            "device": {"name": device.type if device.type == "cpu" else torch.cuda.get_device_name(device), "tflops": measure_tflops(device),
                       "speed": 1.0},
            "tokens_per_microbatch": float(b * seq),
            "routing": {str(l): [int(c) for c in counts[l].tolist()] for l in moe_ids},
            "routing_tokens": int(len(xs) * b * seq),
            "meta": {
                "model": cfg.model.name, "microbatch_sequences": b, "seq_len": seq, "microbatches": m, "threads": threads,
                "repeats": repeats, "warmup": warmup, "step": step, "dtype": str(amp or torch.float32), "device": str(device),
                "top_k": cfg.moe.top_k, "num_experts": cfg.moe.num_experts, "timer": f"time.perf_counter, {statistic} of repeats after warmup",
                # thread CPU / wall over all timed calls: 1.0 on an idle core; lower when other processes share it
                "cpu_share": clock.cpu / clock.wall if clock.wall > 0 else 1.0,
            },
            "backward_detail": _backward_detail(timer.blocks, timer.rec, stat),
        }
        if step_overhead:
            prof["step_overhead"] = _step_overhead(model, cfg, clock, warmup, repeats, slices, b, seq, m, device, amp)
            prof["step_overhead"]["train_batch_s"] = _median(t_batch)
        return profile_for(prof, cfg, split_backward)


@contextmanager
def _measuring(model: Optional[nn.Module], build: Callable[[], nn.Module], threads: int):
    """Yield the model (`build()` when None) with `threads` intra-op threads, in training mode
    without activation checkpointing (the cost model adds the recompute itself); afterwards the
    threads, the RNG state (also what building drew) and the model's gradients, routing
    counters and modes are as they were."""
    threads_before = torch.get_num_threads()
    rng_state = torch.random.get_rng_state()
    if model is None:
        model = build()
    saved = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}
    saved_stats = {lid: copy.deepcopy(moe.stats) for lid, moe in model.moe_layers()}
    was_training, was_ckpt = model.training, getattr(model, "activation_checkpointing", False)
    torch.set_num_threads(threads)
    try:
        model.train()
        model.activation_checkpointing = False
        yield model
    finally:
        torch.set_num_threads(threads_before)
        torch.random.set_rng_state(rng_state)
        for n, p in model.named_parameters():
            p.grad = saved[n]
        model.train(was_training)
        model.activation_checkpointing = was_ckpt
        for lid, moe in model.moe_layers():
            moe.stats = saved_stats[lid]


def _autocast_wrapper(device: torch.device, amp) -> Callable[[Callable], Callable]:
    """ctx(fn): fn run under the run's autocast (fn itself in fp32)."""
    if amp is None:
        return lambda fn: fn
    return lambda fn: (lambda: _in(lambda: torch.autocast(device_type=device.type, dtype=amp), fn))


def _first_batch(cfg: MoepipeConfig, clock: _Clock, step: int, seq: int, slices: int, m: int, reps: int, warmup: int,
                 device: torch.device) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
    """(timed batch constructions after warmup, the rank's inputs and targets in m microbatches)."""
    from moepipe.data import build_corpus, slice_for_rank, train_batch

    corpus = build_corpus(cfg.data, seq)
    t_batch = []
    for i in range(reps):
        t, (inputs, targets) = clock(lambda: train_batch(corpus, step, cfg.train.seed, cfg.train.batch_size, seq))
        if i >= warmup:
            t_batch.append(t)
    x_all = slice_for_rank(inputs, 0, slices).to(device)
    y_all = slice_for_rank(targets, 0, slices).to(device)
    return t_batch, list(x_all.chunk(m)), list(y_all.chunk(m))


def _block_inputs(model: nn.Module, xs: list[torch.Tensor], ctx, moe_ids: list[int], E: int):
    """(tokens per expert per MoE block, every block's input per microbatch, the last block's
    output per microbatch): one forward without a graph."""
    blocks = list(model.layers.values())
    cos, sin = model.rope_cos, model.rope_sin
    counts = {l: torch.zeros(E, dtype=torch.float64) for l in moe_ids}
    h_in: list[list[torch.Tensor]] = [[] for _ in blocks]
    h_out: list[torch.Tensor] = []
    with torch.no_grad():
        for x in xs:
            h = ctx(lambda: model.tok_embeddings(x))()
            for li, blk in enumerate(blocks):
                h_in[li].append(h.detach())
                if blk.is_moe:
                    blk.ffn.stats.reset()
                h = ctx(lambda blk=blk, h=h: blk(h, cos, sin))()
                if blk.is_moe:
                    counts[blk.layer_id] += blk.ffn.stats.demand.double().cpu()  # counters live on the layer's device
            h_out.append(h.detach())
    return counts, h_in, h_out


class _PartTimer:
    """Times forward and the three backwards of each part of the model for one repetition r
    (microbatch r mod m); samples after warmup go to `rec`."""

    def __init__(self, model, clock, rec, ctx, xs, ys, h_in, h_out, g_hidden, gen, warmup, m, device):
        self.model, self.clock, self.rec, self.ctx = model, clock, rec, ctx
        self.xs, self.ys, self.h_in, self.h_out, self.g_hidden = xs, ys, h_in, h_out, g_hidden
        self.gen, self.warmup, self.m, self.device = gen, warmup, m, device
        self.blocks = list(model.layers.values())
        self.emb_params = list(model.tok_embeddings.parameters())
        self.head_params = list(model.norm.parameters()) + list(model.output.parameters())

    def embedding(self, r: int) -> None:
        # Tokens carry no gradient, so the embedding's whole backward is its weight gradient.
        j = r % len(self.xs)
        x = self.xs[j]
        _time_backward(self.clock, self.ctx(lambda: (self.model.tok_embeddings(x), [x])), self.g_hidden[j], self.emb_params,
                       self.rec, "embedding", r >= self.warmup)

    def block(self, li: int, r: int) -> None:
        # The whole block, then its routed experts alone on the routing the block produced.
        j = r % len(self.xs)
        blk = self.blocks[li]
        lid = blk.layer_id
        moe = blk.ffn if blk.is_moe else None
        cos, sin = self.model.rope_cos, self.model.rope_sin
        captured: list = []
        if moe is not None:
            inner = moe.dispatcher

            def spy(flat, routing, experts):
                captured.append((flat.detach(), routing))
                return inner(flat, routing, experts)

            moe.dispatcher = spy

        def fwd():
            x = self.h_in[li][j].clone().requires_grad_(True)
            return blk(x, cos, sin), [x]

        try:
            _time_backward(self.clock, self.ctx(fwd), self.g_hidden[j], list(blk.parameters()), self.rec, f"block{lid}", r >= self.warmup)
        finally:
            if moe is not None:
                moe.dispatcher = inner
        if moe is not None:
            self._experts(moe, lid, captured[-1], r)

    def _experts(self, moe, lid: int, captured, r: int) -> None:
        from moepipe.model.moe import run_experts_sorted

        flat, routing = captured
        sizes = routing.kept_counts.tolist()
        ids = list(range(len(sizes)))
        x_sorted = flat[routing.token_idx]
        g_sorted = torch.randn(x_sorted.shape, generator=self.gen).to(device=self.device, dtype=x_sorted.dtype) * 1e-3

        def efwd():
            xx = x_sorted.clone().requires_grad_(True)
            return run_experts_sorted(xx, sizes, ids, moe.experts), [xx]

        e_params = [p for e in moe.experts.values() for p in e.parameters()]
        _time_backward(self.clock, self.ctx(efwd), g_sorted, e_params, self.rec, f"experts{lid}", r >= self.warmup)
        if r >= self.warmup:
            self.rec.add(f"experts{lid}", "assignments", float(max(1, sum(sizes))))

    def head(self, r: int) -> None:
        # Final norm, output projection and the schedule's loss (divided by m, as the run's).
        from moepipe.model import lm_loss

        j = r % len(self.xs)

        def hfwd():
            x = self.h_out[j].clone().requires_grad_(True)
            return lm_loss(self.model.output(self.model.norm(x)), self.ys[j]) / self.m, [x]

        _time_backward(self.clock, self.ctx(hfwd), None, self.head_params, self.rec, "head", r >= self.warmup)


def _backward_detail(blocks: list[nn.Module], rec: _Recorder, stat: Callable[[list[float]], float]) -> dict:
    """The profile's `backward_detail`: per block the part outside its routed experts, per MoE
    block the experts per token-expert assignment, the embedding and the head."""
    det_layers: dict[str, dict[str, float]] = {}
    det_experts: dict[str, dict[str, float]] = {}
    for blk in blocks:
        lid = blk.layer_id
        whole = rec.s[f"block{lid}"]
        if blk.is_moe:
            ex = rec.s[f"experts{lid}"]
            # Block minus its experts, paired sample by sample (same repetition, same routing);
            # fwd_s has two samples per repetition (the fused and the split pass).
            dense = {key: stat([max(0.0, a - c) for a, c in zip(whole[key], ex[key])]) for key in whole}
            n = ex["assignments"]
            n2 = [a for a in n for _ in (0, 1)]
            per_tok = {key: stat([t / a for t, a in zip(ex[key], n2 if key == "fwd_s" else n)]) for key in whole}
            det_experts[str(lid)] = per_tok
            det_layers[str(lid)] = dense
        else:
            det_layers[str(lid)] = {key: stat(v) for key, v in whole.items()}
    return {
        "layers": det_layers,
        "expert_per_token_s": det_experts,
        "embedding": rec.med("embedding"),
        "head": rec.med("head"),
        "note": "seconds per microbatch (experts: per token-expert assignment); bwd_fused_s = stage_backward, "
                "bwd_input_s/bwd_weight_s = stage_backward_input/stage_backward_weight (torch.distributed.pipelining)",
    }


def _in(cm_factory, fn):
    with cm_factory():
        return fn()


def _step_overhead(model: nn.Module, cfg: MoepipeConfig, clock: _Clock, warmup: int, repeats: int, slices: int,
                   b: int, seq: int, m: int, device: torch.device, amp) -> dict:
    """Per-step work outside the pipeline that DistributedTrainer.train_step does, per part of
    the model (a rank pays for the parts its stages hold): gradient bookkeeping
    (`sync_gradients` without communication), the global-norm sum, clipping, the AdamW step
    and zero_grad. Timed on copies; the model's own weights and optimizer are not touched.
    Also the last stage's output merge (torch.cat of the m logits chunks the schedule returns).
    Collectives (loss, norm, routing-stat all_reduces; STEP_COLLECTIVES of them) are left to
    the caller, who has the process group to time them on."""
    from moepipe.parallel.grad_sync import _all_reduce_mean, fill_missing_grads
    from moepipe.train.optim import build_optimizer

    parts: dict[str, nn.Module] = {"embedding": model.tok_embeddings}
    for key, blk in model.layers.items():
        parts[f"layer{key}"] = blk
    parts["head"] = nn.ModuleList([model.norm, model.output])
    out: dict[str, Any] = {"layers": {}}
    for name, part in parts.items():
        part = copy.deepcopy(part)
        params = list(part.parameters())
        grads = [torch.randn(p.shape, device=device) * 1e-3 for p in params]
        opt = build_optimizer(part, cfg.optim)

        def one() -> None:
            fill_missing_grads(params)
            _all_reduce_mean(params, None, slices)
            sq = torch.zeros((), dtype=torch.float64, device=device)
            for p in params:
                sq += p.grad.detach().double().pow(2).sum()
            norm = sq.sqrt()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, norm.float())
            opt.step()
            opt.zero_grad(set_to_none=True)

        ts = []
        for r in range(warmup + repeats):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            t, _ = clock(one)
            if r >= warmup:
                ts.append(t)
        if name.startswith("layer"):
            out["layers"][name[len("layer"):]] = _median(ts)
        else:
            out[f"{name}_s"] = _median(ts)
    logits = [torch.randn(b, seq, cfg.model.vocab_size, device=device, dtype=amp or torch.float32) for _ in range(m)]
    out["last_stage_merge_s"] = _median([clock(lambda: torch.cat(logits))[0] for _ in range(warmup + repeats)][warmup:])
    out["collectives_per_step"] = STEP_COLLECTIVES
    out["note"] = ("seconds per optimizer step per part: grad bookkeeping + norm + clip + AdamW + zero_grad (no communication); "
                   "a rank pays the sum over its parts, the last stage also last_stage_merge_s, every rank train_batch_s and "
                   "collectives_per_step small all_reduces")
    return out


class _NullStage(nn.Module):
    """Stand-in pipeline stage: the run's input and output shapes, one scalar weight and next
    to no compute, so a schedule step on it costs only the runtime's own work per action."""

    def __init__(self, first: bool, last: bool, d_model: int, vocab_size: int):
        super().__init__()
        self.first, self.last, self.d, self.vocab = first, last, d_model, vocab_size
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:  # token ids in
            x = torch.zeros(*x.shape, self.d, device=x.device)
        h = x * self.w
        return h[..., :1].repeat(1, 1, self.vocab) if self.last else h


def measure_schedule_overhead(cfg: MoepipeConfig, group, plan=None, steps: int = 5, warmup: int = 2,
                              threads: Optional[int] = None, cpu: Optional[list] = None) -> list[float]:
    """Seconds of `steps` steps of cfg's schedule (torch.distributed.pipelining, the run's
    stage layout, microbatch count and activation shapes) on stand-in stages that compute
    next to nothing: what the runtime costs besides compute (schedule bookkeeping, sends and
    receives). Every pipeline rank of `group` calls it; each returns its own step times, the
    caller takes the slowest rank's per step (`moepipe.sim.calibrate.fit_action_overhead`
    turns that into a per-action cost). `cpu`, when given a list, receives per step the CPU
    seconds the process's other threads (the communication backend's) spent during the step:
    on a rank whose compute shares its cores with them, that time is taken from compute."""
    import torch.distributed as dist

    from moepipe.parallel.pipeline import build_schedule
    from moepipe.train.distributed import default_plan
    from moepipe.train.loop import resolve_device

    plan = plan or default_plan(cfg)
    device = resolve_device(cfg)
    me = dist.get_rank(group)
    m, S = cfg.schedule.microbatches, plan.n_stages
    b, seq = microbatch_shape(cfg)
    mods = {s: _NullStage(s == 0, s == S - 1, cfg.model.d_model, cfg.model.vocab_size).to(device) for s in plan.stages_of_rank(me)}
    sched = build_schedule(cfg.schedule.name, mods, S, m, lambda out, y: out.mean(), device, group, (b, seq), cfg.model.d_model,
                           cfg.model.vocab_size)
    x = torch.zeros(b * m, seq, dtype=torch.long, device=device)
    args = (x,) if 0 in mods else ()
    kwargs = {"target": x, "losses": []} if S - 1 in mods else {}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(default_threads(cfg) if threads is None else int(threads))
    out = []
    try:
        for i in range(warmup + steps):
            dist.barrier(group=group)
            p0, c0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
            sched.step(*args, **kwargs)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
                if cpu is not None:
                    cpu.append(max(0.0, (time.process_time() - p0) - (time.thread_time() - c0)))
    finally:
        torch.set_num_threads(threads_before)
    return out


def step_overhead_s(profile: Mapping[str, Any], plan, allreduce_s: float = 0.0, merge: bool = True) -> float:
    """Per-step seconds outside the pipeline for a plan: the slowest pipeline rank's sum over
    the parts it holds (+ the output merge on the last stage unless `merge` is False: a
    measured schedule overhead already contains it), plus the batch construction and
    `collectives_per_step` small all_reduces of `allreduce_s` each."""
    so = profile["step_overhead"]
    worst = 0.0
    for p in range(plan.pp):
        t = 0.0
        for s in plan.stages_of_rank(p):
            a, e = plan.stage_layers[s]
            t += sum(so["layers"][str(l)] for l in range(a, e))
            if s == 0:
                t += so["embedding_s"]
            if s == plan.n_stages - 1:
                t += so["head_s"] + (so["last_stage_merge_s"] if merge else 0.0)
        worst = max(worst, t)
    return worst + so.get("train_batch_s", 0.0) + so["collectives_per_step"] * allreduce_s


def write_profile(path: str | Path, profile: Mapping[str, Any]) -> None:
    """Write the profile as JSON (atomically: a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1))
    os.replace(tmp, path)
