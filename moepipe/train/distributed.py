"""One rank of a (pp, ep, dp) training job: plan-driven stages, a torch.distributed.pipelining
schedule, expert-parallel dispatch and gradient averaging. Same interface as the
single-process `Trainer`, so the loop, metrics and summary code are shared.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import signal
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from moepipe.config import ConfigError, MoepipeConfig, moe_layer_ids
from moepipe.data import build_corpus, slice_for_rank, train_batch, val_batches
from moepipe.model import MoETransformer, count_parameters, lm_loss
from moepipe.model.routing_stats import RoutingStats
from moepipe.parallel.grad_sync import (ExpertReplicas, MirrorReduce, clip_gradients, global_grad_norm, mirror_groups, split_params,
                                        sync_gradients, tp_partial_params)
from moepipe.parallel.mesh import Mesh
from moepipe.parallel.migration import Entries, exchange, state_layout, transfer_bytes, transfers
from moepipe.parallel.pipeline import build_schedule
from moepipe.parallel.stage_builder import build_stage_module
from moepipe.parallel.tensor_parallel import as_shard, local, local_layout, shard_stage, split_moe_tokens, vocab_parallel_loss
from moepipe.placement.plan import Plan, chain_stages, from_json, stage_assignment, to_json, validate_plan
from moepipe.placement.replan import ReplanLoop, default_plan  # noqa: F401 (default_plan: imported from here too)
from moepipe.placement.topology import from_config as topology_from_config
from moepipe.sim.schedules import plan_style, schedule_chains
from moepipe.train.loop import NonFiniteLossError, StepResult, autocast_context, autocast_dtype, resolve_device, seed_everything
from moepipe.train.optim import VersionedWeights, WeightStash, build_optimizer, delayed_update, lr_at, set_lr
from moepipe.train.block_clock import BlockClock
from moepipe.train.workload import SlowDevice, routing_skew


def inject_fault(rank: int, step: int, where: str = "step") -> None:
    """Test hook: MOEPIPE_INJECT_FAULT="<rank>:<step>:raise|kill[:migration]" fails that rank as
    step index <step> starts, or (":migration") in the middle of the migration after <step>
    steps: state sent and received, new stages not built yet."""
    spec = os.environ.get("MOEPIPE_INJECT_FAULT")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:  # first attempt only
        return
    want_rank, want_step, kind, *at = spec.split(":")
    if int(want_rank) == rank and int(want_step) == step and (at[0] if at else "step") == where:
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")


def check_plan_for_job(plan: Plan, cfg: MoepipeConfig) -> Plan:
    """A valid plan can still be wrong for this job: mesh sizes, or a stage placement other
    than the one the schedule will execute (the engine fixes loop or V placement itself)."""
    par, sch = cfg.parallel, cfg.schedule
    if (plan.pp, plan.ep, plan.dp) != (par.pp, par.ep, par.dp):
        raise ConfigError(f"plan mesh (pp, ep, dp)={(plan.pp, plan.ep, plan.dp)} != parallel=({par.pp}, {par.ep}, {par.dp}): make a plan for this mesh")
    expected = stage_assignment(par.pp, sch.virtual_stages, plan_style(sch.name))
    if list(plan.stage_to_pp_rank) != expected:
        raise ConfigError(
            f"plan.stage_to_pp_rank={list(plan.stage_to_pp_rank)} but schedule.name={sch.name} places stages as {expected}: "
            "use that stage placement"
        )
    return plan


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_freed_memory() -> None:
    """After a migration the old stages, optimizer state and transfer buffers are garbage:
    collect them and (glibc) hand freed heap pages back to the OS, so resident memory does
    not ratchet up by a little at every re-placement of a long run."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class DistributedTrainer:
    def __init__(self, cfg: MoepipeConfig, mesh: Mesh, plan: Plan | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.world_size = mesh.world_size
        self.device = resolve_device(cfg)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        seed_everything(cfg.train.seed)
        self.corpus = build_corpus(cfg.data, cfg.train.seq_len)
        if self.corpus.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} < the data's vocabulary ({self.corpus.vocab_size}): raise model.vocab_size")
        self.slices = mesh.ep * mesh.dp
        # sequence parallelism: each TP rank holds seq_len/tp positions of every activation
        self.sp = bool(cfg.parallel.sp) and mesh.tp > 1
        self.moe_ids = moe_layer_ids(cfg.model, cfg.moe)
        self._topology = None
        self._shadow_setups = None  # placer.shadow_slots: per MoE layer, the fast path's cost-model setup
        self._shadow_load: dict[int, np.ndarray] = {}  # the last step's [ep, E] counts per MoE layer (the decision's input)
        self._step_shadows = None  # this step's StepShadows while the schedule runs
        self._shadow_mismatch_warned = False
        if cfg.topology.detect or cfg.topology.probe:
            self._topology = self._measured_topology()  # collective: every rank, at start-up
        self._skew = None  # this step's injected routing skew (workload.kind)
        self._done = 0  # steps completed when the current re-plan started
        self.speed = self.topology.devices[mesh.rank].speed if cfg.workload.emulate_speed else 1.0
        self.val_set = val_batches(self.corpus, cfg.train.eval_batches, cfg.train.batch_size, cfg.train.seq_len)
        with torch.device("meta"):
            full = MoETransformer(cfg.model, cfg.moe)
        self._param_counts = count_parameters(full)
        self.full_layout = state_layout(full)  # name -> shape of every state entry
        self.layout = local_layout(self.full_layout, mesh.tp)  # what this rank holds of each (migration moves TP shards)
        # statistics, forecast, decision and its measured re-check; this trainer reduces the
        # statistics, broadcasts rank 0's decision and migrates
        self.replan = ReplanLoop(cfg, lambda: self.topology)
        # chimera: a second model replica runs the other way; its stages' gradients are summed
        # with the first's over the mirrored pp rank (one group per pair of ranks: collective)
        self.chains = schedule_chains(cfg.schedule.name)
        self._mirror_group = mirror_groups(mesh) if self.chains == 2 else None
        self._build(check_plan_for_job(validate_plan(plan or default_plan(cfg), cfg.model.n_layers, self.moe_ids, cfg.moe.num_experts), cfg))

    def _measured_topology(self):
        """topology.detect: node grouping and device properties from the launcher and torch;
        topology.probe: point-to-point and all-to-all figures measured on this job's group."""
        from moepipe.placement.topology import apply_probe, detect_topology, probe_links

        cfg, n = self.cfg, self.mesh.world_size
        topo = detect_topology(n, base=cfg.topology, use_cuda=self.device.type == "cuda") if cfg.topology.detect else topology_from_config(cfg.topology, n)
        return apply_probe(topo, probe_links(device=self.device)) if cfg.topology.probe else topo

    @property
    def topology(self):
        """The job's topology (built when first needed: static runs never read it)."""
        if self._topology is None:
            self._topology = topology_from_config(self.cfg.topology, self.mesh.world_size)
        return self._topology

    def _shadow_policy(self, layer_id: int):
        """placer.shadow_slots: the fast path's decision for MoE layer `layer_id` on this rank's EP
        group (moepipe.placement.shadows.choose_shadows on the job's cost model and topology,
        schedule.microbatches per weight exchange: the runtime exchanges weights and gradients
        once per step). Every rank of the group builds the same one, so all decide alike."""
        from moepipe.model.shadow_exchange import shadow_policy
        from moepipe.placement.placers.inputs import inputs_from_config
        from moepipe.placement.shadows import choose_shadows, layer_setup

        if self._shadow_setups is None:
            # the declared topology, not a detected/probed one: that may differ between ranks,
            # and every rank must decide alike
            self._shadow_setups, self._shadow_topo = {}, topology_from_config(self.cfg.topology, self.mesh.world_size)
            self._shadow_cm = inputs_from_config(self.cfg, topology=self._shadow_topo).cost_model
        setup = self._shadow_setups.get(layer_id)
        if setup is None:
            mesh = self.mesh
            group = list(range(mesh.rank - mesh.ep_rank, mesh.rank - mesh.ep_rank + mesh.ep))
            setup = self._shadow_setups[layer_id] = layer_setup(self._shadow_cm, self._shadow_topo, group, layer_id,
                                                                microbatches=self.cfg.schedule.microbatches)
        return shadow_policy(choose_shadows, setup, self.cfg.placer.shadow_slots)

    def _begin_shadows(self) -> None:
        """Start of a step: decide every MoE layer's shadows from the last step's counts (the
        all-reduced routing statistics: the same on every rank; none on the first step) and
        exchange their weights, one all-to-all over the EP group for all layers
        (moepipe.model.shadow_exchange)."""
        from moepipe.model.shadow_exchange import StepShadows

        if self.cfg.placer.shadow_slots <= 0 or not self._shadow_load:
            return
        chosen, holders, experts, dispatchers = {}, {}, {}, {}
        for module in self.modules.values():
            for layer_id, moe in module.moe_layers():
                load = self._shadow_load.get(layer_id)
                h = self.plan.expert_map[layer_id]
                policy = self._shadow_policy(layer_id)
                chosen[layer_id] = {} if load is None or not load.any() else dict(policy(load, h))
                holders[layer_id], experts[layer_id], dispatchers[layer_id] = h, moe.experts, moe.dispatcher
        if not self._shadows_agree(chosen):
            return
        if not any(chosen.values()):  # every rank alike: no exchange this step
            return
        cfg = self.cfg
        step = StepShadows(chosen, holders, self.mesh.ep_rank, self.mesh.ep_group, self.mesh.ep, experts, cfg.model.d_model,
                           cfg.moe.expert_hidden, torch.empty(0, device=self.device))
        for layer_id, d in dispatchers.items():
            d.use_shadows(chosen[layer_id], lambda l=layer_id: step.experts_for(l))
        self._step_shadows = step

    def _shadows_agree(self, chosen: dict) -> bool:
        """Every EP rank decided the same shadow sets? The inputs are bit-identical, but the
        decision is floating-point numpy, and hosts with other SIMD kernels could break a near tie
        apart; differing sets would pair the exchange wrongly. One all-reduce (max of the digest
        and of its negation) per step; on a mismatch the whole group runs this step without
        shadows (every rank sees the same result)."""
        from moepipe.model.shadow_exchange import shadow_digest

        if self.mesh.ep < 2:
            return True
        d = shadow_digest(chosen)
        t = torch.tensor([d, -d], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.mesh.ep_group)
        if int(t[0]) == d and -int(t[1]) == d:
            return True
        if not self._shadow_mismatch_warned:
            self._shadow_mismatch_warned = True
            print(f"moepipe: rank {self.mesh.rank}: EP ranks decided different shadow sets; this step (and any other such) runs without "
                  "shadows", file=sys.stderr, flush=True)
        return False

    def _end_shadows(self) -> None:
        """After the step's last backward, before gradient sync: the shadows' gradients go home
        (one all-to-all over the EP group) and the dispatchers drop the step's shadows."""
        step, self._step_shadows = self._step_shadows, None
        if step is None:
            return
        step.return_grads()
        for module in self.modules.values():
            for _, moe in module.moe_layers():
                moe.dispatcher.use_shadows({})

    def shadow_usage(self) -> dict:
        """Shadow copies the dispatchers ran since the start (this rank's EP group; per MoE layer)."""
        out = {}
        for module in self.modules.values():
            for layer_id, moe in module.moe_layers():
                d = moe.dispatcher
                out[layer_id] = {"copies": getattr(d, "shadow_copies", 0), "calls": getattr(d, "shadow_calls", 0)}
        return out

    def _shadow_copies_this_step(self) -> int:
        """Shadow copies this rank's MoE layers ran since the last call (the metrics rank's row:
        the last pipeline stage's layers, every microbatch, recomputed forwards included)."""
        total = sum(u["copies"] for u in self.shadow_usage().values())
        seen, self._shadow_seen = self._shadow_seen, total
        return total - seen

    def _build(self, plan: Plan, entries: Optional[Entries] = None) -> None:
        """Stages, dispatch, gradient bookkeeping, optimizer and schedule for `plan`; with
        `entries` (a migration), the stages and the optimizer adopt those tensors."""
        cfg, mesh = self.cfg, self.mesh
        self.plan = plan
        self._shadow_seen = 0  # new dispatchers count from zero
        held = chain_stages(plan, mesh.pp_rank, self.chains)  # executed stage -> plan stage (two chains: chimera)
        self.stage_ids = list(held)
        # TP shards become DTensors again (no communication), adopted by the sharded meta stage
        values = None if entries is None else {n: as_shard(n, ts[0], mesh, self.full_layout[n].shape) for n, ts in entries.items()}
        self.modules: dict[int, MoETransformer] = {
            s: build_stage_module(cfg.model, cfg.moe, plan, p, mesh.ep_rank, self.device, cfg.train.seed, values,
                                  shard=lambda m: shard_stage(m, mesh, self.sp)) for s, p in held.items()
        }
        self.slowdowns = [SlowDevice(m, self.speed) for m in self.modules.values()] if self.speed < 1 else []
        self.clock = BlockClock(list(self.modules.values()), cfg.model.n_layers, self.device)
        # node groups only where the mesh made them (a plug-in backend written before them still attaches)
        nodes = {"node_groups": mesh.node_groups} if getattr(mesh, "node_groups", None) is not None else {}
        ep_per_node = max(1, cfg.topology.devices_per_node // mesh.tp)  # a node holds devices_per_node/tp EP ranks
        for module in self.modules.values():
            module.activation_checkpointing = cfg.train.activation_checkpointing
            for layer_id, moe in module.moe_layers():
                moe.attach_expert_group(plan.expert_map[layer_id], mesh.ep_rank, mesh.ep_group, a2a=cfg.parallel.a2a,
                                        local_size=ep_per_node, **nodes)
            split_moe_tokens(module, mesh, self.sp)  # tp > 1: each TP rank dispatches its share of the tokens (after the EP attach)
        for module in self.modules.values():  # token origins: this rank's row of [ep, E] (summed over the world per step)
            for _, moe in module.moe_layers():
                moe.stats.set_source(mesh.ep_rank, mesh.ep)
        self.dense, self.expert = split_params(list(self.modules.values()))
        self.tp_partial = tp_partial_params(list(self.modules.values()), self.sp) if mesh.tp > 1 else []
        # the global norm counts each weight once: the first replica's copies only
        self.norm_dense, self.norm_expert = split_params([m for s, m in self.modules.items() if s < plan.n_stages])
        self.mirror = MirrorReduce(self.modules, plan.n_stages, self._mirror_group) if self.chains == 2 else None
        self.replicas = ExpertReplicas(list(self.modules.values()), plan.expert_map, mesh.ep_rank, mesh.ep_group, self.device)
        self.optimizer = build_optimizer(torch.nn.ModuleList(self.modules.values()), cfg.optim)
        # pipedream_2bw: two weight versions, step t's gradient at W(t-1). Pipelined: no flush
        # between steps (StreamExecutor + VersionedWeights); one pipeline rank: WeightStash
        params = [p for mod in self.modules.values() for p in mod.parameters()]
        two_bw = delayed_update(cfg.schedule.name)
        self.versions = VersionedWeights(params) if two_bw and mesh.pp > 1 else None
        self.stash = WeightStash(params) if two_bw and self.versions is None else None
        self._batch_step: dict[int, int] = {}  # 2BW stream: executor batch -> trainer step (its lr)
        stream = None if self.versions is None else {"WEIGHTS": lambda s, v: self.versions.bind(v),
                                                     "REDUCE_GRAD": lambda s, b: self.versions.take_grads(b)}
        m = cfg.schedule.microbatches
        microbatch = (cfg.train.batch_size // (self.slices * m), cfg.train.seq_len)
        self.schedule = build_schedule(
            cfg.schedule.name, self.modules, plan.n_stages, m, self._loss_fn(m), self.device, mesh.pp_group,
            microbatch, cfg.model.d_model, cfg.model.vocab_size // mesh.tp, self.amp_dtype or torch.float32, executor=cfg.schedule.executor,
            stream_handlers=stream, chain_handlers=None if self.mirror is None else {"REDUCE_GRAD": self.mirror.stage_done},
            # under activation checkpointing I recomputes the graph anyway, and keeping each Linear's
            # input from the forward to W would undo the checkpointing: lean W is off
            lean_weight_grad=cfg.schedule.lean_weight_grad and not cfg.train.activation_checkpointing,
            seq_shards=mesh.tp if self.sp else 1,
        )
        self.holds_first = any(s % plan.n_stages == 0 for s in self.stage_ids)  # a chain's first stage: needs the tokens
        self.holds_last = any(s % plan.n_stages == plan.n_stages - 1 for s in self.stage_ids)

    def _loss_fn(self, m: int):
        """A microbatch's share of the step's mean loss. Under TP the head's logits are split
        by vocabulary ([..., V/tp], every position: under SP the head gathers the sequence):
        the vocabulary-parallel cross-entropy, the same value on every TP rank, each seeding
        the gradient of its own logits' columns."""
        if self.mesh.tp == 1:
            return lambda out, y: lm_loss(out, y) / m
        return lambda out, y: vocab_parallel_loss(out, y, self.mesh) / m

    # ------------------------------------------------------------------ one step

    def _run(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Run the schedule on this pipeline's slice; return the global mean loss (all ranks)."""
        x = slice_for_rank(inputs, self.mesh.data_shard, self.slices).to(self.device)
        y = slice_for_rank(targets, self.mesh.data_shard, self.slices).to(self.device)
        args = (x,) if self.holds_first else ()
        kwargs = {"target": y, "losses": []} if self.holds_last else {}
        with self._autocast():
            self.schedule.step(*args, **kwargs)
        local = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.holds_last and self.mesh.tp_rank == 0:  # TP ranks compute the same loss: count it once
            local += sum(float(l.detach()) for l in kwargs["losses"])
        dist.all_reduce(local)
        # Last-stage ranks of all S pipelines contributed their slice's loss (already /m).
        return float(local) / self.slices

    def train_step(self, step: int) -> StepResult:
        cfg = self.cfg
        inject_fault(self.mesh.rank, step)
        start = time.perf_counter()
        skew = self._skew = routing_skew(cfg, step, source=self.mesh.ep_rank)
        self.clock.take()  # drop evaluation forwards: only training steps count
        for module in self.modules.values():
            module.train()
            # each TP rank seeds the replicated aux loss; the TP group sums its gradient (under
            # sequence parallelism each seeds its own shard's share of it)
            module.set_aux_loss_scale(1.0 / (cfg.schedule.microbatches * (1 if self.sp else self.mesh.tp)))
            module.reset_routing_stats()
            module.set_routing_skew(skew)
        lr = lr_at(step, cfg.train.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        inputs, targets = train_batch(self.corpus, step, cfg.train.seed, cfg.train.batch_size, cfg.train.seq_len)
        if self.versions is not None:
            return self._stream_step(step, inputs, targets, start)
        self.optimizer.zero_grad(set_to_none=True)
        if self.stash is not None:
            self.stash.compute()
        self._begin_shadows()
        try:
            loss = self._run(inputs, targets)
        finally:
            if self.stash is not None:
                self.stash.restore()
        self._end_shadows()  # every rank (collective), before the gradient sync reads .grad
        if self.mirror is not None:  # chimera: both replicas of each stage now hold the whole batch's gradient
            self.mirror.wait()  # before any early exit (a skipped non-finite step): no all-reduce outlives its step
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss={loss} at step {step}: lower optim.lr or raise optim.warmup_steps")
        sync_gradients(self.dense, self.expert, self.mesh, self.tp_partial)
        self.replicas.sync()  # copies of a replicated expert each saw part of its tokens
        norm = global_grad_norm(self.norm_dense, self.replicas.primary_only(self.norm_expert), self.mesh)
        if not math.isfinite(float(norm)):  # all-reduced: every rank takes the same branch
            raise NonFiniteLossError(f"grad_norm={float(norm)} at step {step}: lower optim.lr or raise optim.warmup_steps")
        if cfg.optim.grad_clip > 0:
            clip_gradients(self.dense + self.expert, norm, cfg.optim.grad_clip)
        if self.stash is not None:
            self.stash.before_update()
        self.optimizer.step()
        stats = self._global_routing_stats()
        for module in self.modules.values():
            for layer_id, moe in module.moe_layers():
                moe.update_expert_bias(stats[layer_id].demand)  # global demand: replicas stay identical
        block_seconds = self._block_seconds(first=step == 0)
        result = StepResult.from_stats(loss, float(norm), lr, start, inputs.numel(), stats)
        if cfg.placer.shadow_slots > 0:
            result.routing["shadow_copies"] = self._shadow_copies_this_step()
        demand = {layer_id: s.demand.double().numpy() for layer_id, s in stats.items()}  # reduced: same on all ranks
        origins = {layer_id: s.origins.double().numpy() for layer_id, s in stats.items()}  # [ep, E] per layer
        if cfg.placer.shadow_slots > 0:
            self._shadow_load = origins  # the next step's shadow decision (the same on every rank)
        self.replan.observe(step, demand, block_seconds, result.seconds, origins=origins)
        return result

    def _stream_step(self, step: int, inputs: torch.Tensor, targets: torch.Tensor, start: float) -> StepResult:
        """PipeDream-2BW without a flush: run batch `step` (its last backwards run next step), then
        apply the previous batch's gradient, now complete on every rank (W(b) = W(b-1) - update(g_{b-1})).
        The row reports this batch's loss and the applied gradient's norm and lr (0 on a step
        that applies none: the first after a drain)."""
        loss = self._run(inputs, targets)  # .grad keeps the in-flight batch's partial gradient: no zero_grad
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss={loss} at step {step}: lower optim.lr or raise optim.warmup_steps")
        batch = self.schedule.batch
        self._batch_step[batch] = step
        norm, lr = 0.0, 0.0
        if batch - 1 in self.versions.ready:  # every rank alike: none only on the first step after a drain
            norm, lr = self._apply_2bw(batch - 1)
        stats = self._global_routing_stats()
        for module in self.modules.values():
            for layer_id, moe in module.moe_layers():
                moe.update_expert_bias(stats[layer_id].demand)
        block_seconds = self._block_seconds(first=step == 0)
        result = StepResult.from_stats(loss, norm, lr, start, inputs.numel(), stats)
        demand = {layer_id: s.demand.double().numpy() for layer_id, s in stats.items()}
        origins = {layer_id: s.origins.double().numpy() for layer_id, s in stats.items()}
        self.replan.observe(step, demand, block_seconds, result.seconds, origins=origins)
        return result

    def _apply_2bw(self, batch: int) -> tuple[float, float]:
        """Sync, clip and apply batch `batch`'s gradient with the lr of the step that ran it."""
        cfg = self.cfg
        lr = lr_at(self._batch_step.pop(batch), cfg.train.steps, cfg.optim)
        set_lr(self.optimizer, lr)
        with self.versions.update(batch):
            sync_gradients(self.dense, self.expert, self.mesh, self.tp_partial)
            self.replicas.sync()
            norm = global_grad_norm(self.dense, self.replicas.primary_only(self.expert), self.mesh)
            if not math.isfinite(float(norm)):
                raise NonFiniteLossError(f"grad_norm={float(norm)} at batch {batch}: lower optim.lr or raise optim.warmup_steps")
            if cfg.optim.grad_clip > 0:
                clip_gradients(self.dense + self.expert, norm, cfg.optim.grad_clip)
            self.optimizer.step()
        return float(norm), lr

    def drain_pipeline(self) -> None:
        """2BW without a flush: finish the in-flight backwards and apply the last batch's
        gradient, so the parameters are W(steps done) (before evaluation, checkpoints, moves)."""
        if self.versions is None or self.schedule.batch < 0:
            return
        self.schedule.drain()
        batch = self.schedule.batch
        if batch in self.versions.ready:
            self._apply_2bw(batch)
        self.versions.latest(batch)

    def _global_routing_stats(self) -> dict[int, RoutingStats]:
        """Sum every rank's counters into whole-job per-layer statistics (on all ranks)."""
        E = self.cfg.moe.num_experts
        if not self.moe_ids:
            return {}
        row = {lid: i for i, lid in enumerate(self.moe_ids)}
        # packed on the device from the device-side counters: NCCL reduces device tensors only,
        # and nothing is read back before the reduction
        O = self.mesh.ep * E  # token origins [ep, E] after the scalars
        packed = torch.zeros(len(self.moe_ids), 2 * E + 4 + O, dtype=torch.float64, device=self.device)
        # TP ranks route the same tokens: count once; under sequence parallelism each routes its
        # own shard (summed; the shards of one microbatch are one call)
        for module in self.modules.values() if self.mesh.tp_rank == 0 or self.sp else ():
            for layer_id, moe in module.moe_layers():
                s = moe.stats
                scalars = torch.stack([s.asked.double(), s.aux_loss_sum.double(), s.z_loss_sum.double()]).to(self.device)
                packed[row[layer_id], : 2 * E] = torch.cat([s.demand.double(), s.kept.double()]).to(self.device)
                packed[row[layer_id], 2 * E : 2 * E + 3] = scalars
                packed[row[layer_id], 2 * E + 3] = s.calls if self.mesh.tp_rank == 0 else 0
                packed[row[layer_id], 2 * E + 4 :] = s.origins.double().reshape(-1).to(self.device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        out = {}
        for layer_id, i in row.items():
            s = RoutingStats(E, 0, self.mesh.ep)
            s.demand, s.kept = packed[i, :E].round().long(), packed[i, E : 2 * E].round().long()
            s.origins = packed[i, 2 * E + 4 :].round().long().view(self.mesh.ep, E)
            s.asked, s.aux_loss_sum, s.z_loss_sum, s.calls = int(packed[i, 2 * E]), float(packed[i, 2 * E + 1]), float(packed[i, 2 * E + 2]), int(packed[i, 2 * E + 3])
            out[layer_id] = s
        return out

    @torch.no_grad()
    def _forward_only(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Evaluation: each microbatch walks the stages in order, activations moving by
        point-to-point sends. Works for any stage-to-rank assignment (the engine's own eval
        fails for the V-shaped zbv/dualpipev schedules in torch 2.13)."""
        m = self.cfg.schedule.microbatches
        x_all = slice_for_rank(inputs, self.mesh.data_shard, self.slices).to(self.device)
        y_all = slice_for_rank(targets, self.mesh.data_shard, self.slices).to(self.device)
        owner = self.plan.stage_to_pp_rank
        last_here = self.plan.n_stages - 1 in self.modules  # chimera evaluates on its first replica only
        d = self.cfg.model.d_model
        total = 0.0
        loss_fn = self._loss_fn(1)
        for x, y in zip(x_all.chunk(m), y_all.chunk(m)):
            held = x.shape[1] // self.mesh.tp if self.sp else x.shape[1]  # positions an activation holds
            h = x
            for stage in range(self.plan.n_stages):
                if owner[stage] != self.mesh.pp_rank:
                    continue
                if stage > 0 and owner[stage - 1] != self.mesh.pp_rank:
                    h = torch.empty(x.shape[0], held, d, device=self.device)
                    dist.recv(h, group=self.mesh.pp_group, group_src=owner[stage - 1])
                with self._autocast():
                    h = self.modules[stage](h)
                if stage < self.plan.n_stages - 1 and owner[stage + 1] != self.mesh.pp_rank:
                    dist.send(h.float().contiguous(), group=self.mesh.pp_group, group_dst=owner[stage + 1])
            if last_here:
                total += float(loss_fn(h, y)) / m
        local = torch.tensor(total if last_here and self.mesh.tp_rank == 0 else 0.0, dtype=torch.float64, device=self.device)
        dist.all_reduce(local)
        return float(local) / self.slices

    def _autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.drain_pipeline()
        for module in self.modules.values():
            module.eval()
        losses = [self._forward_only(x, y) for x, y in self.val_set]
        for module in self.modules.values():
            module.train()
            module.reset_routing_stats()
        return float(np.mean(losses))

    def parameter_counts(self) -> dict[str, int]:
        return dict(self._param_counts)

    # ------------------------------------------------------------------ dynamic placement

    def _block_seconds(self, first: bool = False) -> np.ndarray | None:
        """Each block's step time on a nominal-speed device: forward time measured here x 3
        (backward ~ 2 forwards), x this device's speed, max over the ranks holding the block.
        Only without expert parallelism: with EP a block's forward also waits in the
        all-to-alls for its peers, which says nothing about the block's own cost, so the placer
        models those blocks from the routed-token counts instead."""
        seconds = self.clock.take()
        # first: the first step's times include one-off start-up costs; tp > 1: a measured block
        # time already holds its TP collectives, which the cost model would add again
        if self.mesh.ep > 1 or self.mesh.tp > 1 or first:
            return None
        # chimera: each copy of a block ran half the microbatches; the block's step time is both copies'
        fwd = torch.from_numpy(seconds * self.speed * 3.0 * self.chains).to(self.device)
        dist.all_reduce(fwd, op=dist.ReduceOp.MAX)
        return fwd.cpu().double().numpy()

    def after_step(self, done: int) -> list[dict]:
        """Every `placer.interval` steps: re-plan from fresh statistics and migrate when the
        re-plan loop expects a saving over the next interval larger than the migration's cost."""
        if not self.replan.due(done):
            return []
        self._done = done
        self.replan.settle()  # every rank: the loop's state stays identical
        decision = self._decide(done)
        plan = from_json(decision["plan"])
        migration = self.migrate(plan) if decision["migrate"] else None
        event = self.replan.event(done, decision, migration)
        self.replan.note_decision(done, decision)
        if migration is not None:
            self.replan.record_migration(event)
        rss = torch.tensor(resident_bytes(), dtype=torch.float64, device=self.device)
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        event["max_rank_rss_mb"] = float(rss) / 2**20  # leak watch over long runs (soak)
        return [event]

    def _decide(self, done: int) -> dict:
        """The re-plan loop proposes on rank 0 and its decision is broadcast, so every rank applies
        the same plan even if floating-point results could differ between machines."""
        box: list = [None]
        if self.mesh.rank == 0:
            try:
                box[0] = self.replan.propose(done, self.plan)
            except Exception as err:  # the other ranks must not wait in the broadcast forever
                box[0] = {"error": f"{type(err).__name__}: {err}"}
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
        if "error" in decision:
            raise RuntimeError(f"the placer failed on rank 0: {decision['error']}")
        return decision

    def _entries(self) -> Entries:
        """This rank's state by global name: [value] for buffers, [value, exp_avg, exp_avg_sq,
        step] for parameters (zeros before the first optimizer step)."""
        out: Entries = {}
        for module in self.modules.values():
            params = dict(module.named_parameters())
            for name, t in module.state_dict(keep_vars=True).items():
                if name not in params:
                    out[name] = [local(t.detach())]
                    continue
                st = self.optimizer.state.get(t) or {}
                # two separate zero tensors when there is no state yet: a migration adopts the moments
                moments = [local(st[k]) if k in st else torch.zeros_like(local(t.detach())) for k in ("exp_avg", "exp_avg_sq")]
                out[name] = [local(t.detach()), *moments, st.get("step", torch.zeros(()))]
        return out

    def _load_optimizer_state(self, entries: Entries) -> None:
        """AdamW state of every parameter from its entry, adopting the moment tensors."""
        for module in self.modules.values():
            for name, p in module.named_parameters():
                src = entries[name]
                self.optimizer.state[p] = {
                    "step": torch.tensor(float(src[3].reshape(-1)[0]), dtype=torch.float32),  # AdamW keeps it on the CPU
                    "exp_avg": as_shard(name, src[1].to(p.device, p.dtype), self.mesh, tuple(p.shape)),
                    "exp_avg_sq": as_shard(name, src[2].to(p.device, p.dtype), self.mesh, tuple(p.shape)),
                }

    def migrate(self, new_plan: Plan) -> dict:
        """Move to `new_plan`: parameters, buffers and AdamW state go point-to-point to their
        new holders, then stages, dispatch maps, replica sync and the schedule are rebuilt."""
        cfg = self.cfg
        new_plan = check_plan_for_job(validate_plan(new_plan, cfg.model.n_layers, self.moe_ids, cfg.moe.num_experts), cfg)
        start = time.perf_counter()
        # the fastest sources on a declared topology; a detected/probed one may differ between
        # ranks, and every rank derives the transfer list alone, so then mesh order decides
        # (under TP, each TP index moves its own shards among the plan's mesh ranks: the links
        # between the ranks holding that index)
        ranks = [self.mesh.world_rank(s) for s in range(self.mesh.pp * self.mesh.ep * self.mesh.dp)]
        bw = None if cfg.topology.detect or cfg.topology.probe else self.topology.bandwidth[np.ix_(ranks, ranks)]
        moves = transfers(self.plan, new_plan, self.layout, bw, self.chains)
        self.drain_pipeline()  # 2BW: nothing in flight moves; the rebuilt stages restart the delay
        self.optimizer.zero_grad(set_to_none=True)  # gradients are not state: free them before anything new is allocated
        entries = self._entries()
        received, _ = exchange(self.mesh.slot, moves, entries, self.layout, self.device, peer=self.mesh.world_rank)
        entries.update(received)
        del received
        inject_fault(self.mesh.rank, self._done, "migration")
        for hooks in self.slowdowns + [self.clock]:
            hooks.remove()
        # the new stages adopt the tensors this rank keeps (no copy): peak memory is the old
        # state plus what arrives, not the old and new stages side by side
        self.modules = self.optimizer = self.schedule = None
        self._build(new_plan, entries)
        self._load_optimizer_state(entries)
        for module in self.modules.values():  # evaluations before the next step see the same routing
            module.set_routing_skew(self._skew)
        del entries
        release_freed_memory()
        took = torch.tensor(time.perf_counter() - start, dtype=torch.float64, device=self.device)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return {"bytes_moved": transfer_bytes(moves, self.layout) * self.mesh.tp, "migration_s": float(took), "plan": to_json(new_plan)}

    def placer_state(self) -> dict[str, torch.Tensor]:
        """The re-plan loop's statistics (same on every rank), for checkpoints."""
        return {k: torch.from_numpy(np.array(v)) for k, v in self.replan.state_dict().items()}

    def load_placer_state(self, state: dict[str, torch.Tensor]) -> None:
        self.replan.load_state_dict(state)
