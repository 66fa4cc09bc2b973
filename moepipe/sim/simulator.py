"""One training iteration, simulated: plan + schedule + topology + cost model + routing -> times.

Granularity: the event timeline has one compute lane and one communication lane per
pipeline rank. The EP (and DP) members of a pipeline rank share its event boundaries: MoE
all-to-alls lock-step an EP group, and every DP replica runs the same order (each action
lasts as long as the slowest replica's). Per-device detail (compute busy time, activation
memory) is kept per global rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import dataclasses

import numpy as np

from moepipe.config import ConfigError
from moepipe.placement.cost_model import CostModel, StageCosts, exchange_time, stage_costs
from moepipe.placement import tensor_parallel_cost as tpc
from moepipe.placement.plan import Plan, chain_stages, rank_grid, validate_plan
from moepipe.placement.topology import Topology
from moepipe.sim import engine
from moepipe.sim.schedules import Order, order_traits, schedule_chains, schedule_order, steady_iteration


@dataclass
class SimResult:
    schedule: str
    pp: int
    ep: int
    dp: int
    n_stages: int
    microbatches: int
    iteration_time_s: float  # pipeline + gradient all-reduce
    pipeline_time_s: float
    grad_sync_s: float
    bubble_fraction: float  # 1 - busy / (pp * pipeline time), busy = time in actions (all-to-alls included)
    idle_fraction: float  # 1 - device compute / (world * iteration time): also counts EP imbalance and communication
    lower_bound_s: float  # total work / total device throughput
    balanced_bound_s: float  # same schedule, balanced stages and experts, free communication
    balanced_comm_bound_s: float  # balanced, plus the communication no placement avoids (see balanced_comm_costs)
    peak_activation_bytes: np.ndarray  # [world] by global rank
    peak_inflight: np.ndarray  # [n_stages] most microbatches whose activations a stage holds at once
    a2a_bytes_intra_node: float
    a2a_bytes_inter_node: float
    p2p_bytes: float
    busy_s: np.ndarray  # [pp]
    timeline: engine.Timeline
    stage_to_pp_rank: list[int]
    costs: Optional[StageCosts] = field(default=None, repr=False)
    a2a_mode: str = "flat"  # parallel.a2a modelled: flat | hierarchical (Tutel's 2DH order)
    a2a_messages_intra_node: int = 0  # all-to-all messages per iteration (every rank, every exchange)
    a2a_messages_inter_node: int = 0
    # weight versions a stage keeps (PipeDream-2BW: 2) and the bytes of parameters each device
    # holds for them (fp32, all versions; optimizer state and gradients not included)
    weight_versions: int = 1
    weight_bytes: Optional[np.ndarray] = None  # [world] by global rank
    flush: bool = True  # False: iteration times are the steady state of a pipeline that never drains
    # tensor parallelism: each of the world's devices is a TP group of tp GPUs (topology.tp_groups);
    # peak_activation_bytes and weight_bytes are then per GPU of the group
    tp: int = 1

    def summary(self) -> dict[str, Any]:
        """Plain JSON-able numbers (no timeline)."""
        return {
            "schedule": self.schedule,
            "pp": self.pp,
            "ep": self.ep,
            "dp": self.dp,
            "tp": self.tp,
            "n_stages": self.n_stages,
            "microbatches": self.microbatches,
            "iteration_time_s": self.iteration_time_s,
            "pipeline_time_s": self.pipeline_time_s,
            "grad_sync_s": self.grad_sync_s,
            "bubble_fraction": self.bubble_fraction,
            "idle_fraction": self.idle_fraction,
            "lower_bound_s": self.lower_bound_s,
            "balanced_bound_s": self.balanced_bound_s,
            "balanced_comm_bound_s": self.balanced_comm_bound_s,
            "peak_activation_bytes": [float(x) for x in self.peak_activation_bytes],
            "peak_inflight_microbatches": [int(x) for x in self.peak_inflight],
            "a2a_bytes_intra_node": self.a2a_bytes_intra_node,
            "a2a_bytes_inter_node": self.a2a_bytes_inter_node,
            "a2a_mode": self.a2a_mode,
            "a2a_messages_intra_node": self.a2a_messages_intra_node,
            "a2a_messages_inter_node": self.a2a_messages_inter_node,
            "weight_versions": self.weight_versions,
            "weight_bytes": None if self.weight_bytes is None else [float(x) for x in self.weight_bytes],
            "flush": self.flush,
            "p2p_bytes": self.p2p_bytes,
            "busy_s": [float(x) for x in self.busy_s],
            "stage_to_pp_rank": list(self.stage_to_pp_rank),
            "n_events": len(self.timeline),
        }

    def write_trace(self, path: str) -> None:
        from moepipe.sim.trace import write_chrome_trace

        write_chrome_trace(self, path)

    def write_gantt(self, path: str) -> None:
        from moepipe.sim.trace import write_gantt

        write_gantt(self, path)


def peak_inflight(res: engine.EngineResult, n_stages: int) -> np.ndarray:
    out = np.zeros(n_stages, dtype=np.int64)
    for snaps in res.inflight.values():
        out = np.maximum(out, snaps.max(0))
    return out


def simulate_order(order: Order, stage_to_rank: list[int], m: int, comp: Any, a2a: Any = None, send: Any = None,
                   overhead: Any = 0.0) -> engine.EngineResult:
    """The engine alone, for hand-built costs: comp/a2a [n_stages, 3] seconds (F, B, W);
    `overhead` seconds per action (scalar or per pipeline rank)."""
    comp = np.asarray(comp, dtype=np.float64)
    a2a = np.zeros_like(comp) if a2a is None else np.asarray(a2a, dtype=np.float64)
    send = np.zeros(len(stage_to_rank)) if send is None else np.asarray(send, dtype=np.float64)
    return engine.run(order, stage_to_rank, m, comp, a2a, send, overhead)


def balanced_comm_costs(cost_model: CostModel, plan: Plan, topology: Topology, n_stages: int, grad_bytes: int = 4) -> tuple[np.ndarray, float]:
    """The communication every placement on this mesh pays, spread evenly: ([3] all-to-all
    seconds per action (F, B, W), gradient all-reduce seconds).

    All-to-all: with routed tokens evenly spread over the EP group at the start, the bytes a
    layer's dispatch moves, and how many cross nodes, depend on the placement only through
    replicas on the senders' own ranks and nodes; the bound takes an even split (every member
    receiving T*top_k/ep tokens, from every member alike) in the job's all-to-all mode. Skewed
    origins let a placement keep tokens at home, so with them this is no lower bound. Each MoE layer pays that on the cheapest
    pipeline rank's EP group, and the layers are shared evenly by the stages. Stage-boundary
    sends depend only on the schedule's stage -> rank map, so the simulator's own are used.
    Gradient sync: every pipeline rank holding 1/pp of the dense (and, with dp > 1, expert)
    parameters, on the cheapest rank's groups. Equal to the communication of a perfectly
    balanced plan when all pipeline ranks' groups are alike; a lower estimate otherwise."""
    spec = cost_model.spec
    grid = rank_grid(plan.pp, plan.ep, plan.dp)  # [pp, dp, ep]
    a2a = np.zeros(3)
    if spec.moe_layers and plan.ep > 1:
        even = np.full(plan.ep, spec.tokens_per_microbatch * spec.top_k / plan.ep * spec.hidden_bytes_per_token)
        per_layer = min(max(exchange_time(None, even, grid[p, d], topology, cost_model.a2a) for d in range(plan.dp)) for p in range(plan.pp))
        a2a[0] = a2a[1] = per_layer * len(spec.moe_layers) / n_stages
    if topology.tp > 1:  # every block's TP collectives, on the cheapest pipeline rank's groups
        T_e = spec.tokens_per_microbatch / plan.ep if cost_model.ep_splits_tokens else spec.tokens_per_microbatch
        per_block = tpc.tp_block_seconds_on(spec, T_e, topology, grid).reshape(3, plan.pp, -1).max(-1).min(-1)
        a2a += per_block * spec.n_layers / n_stages
    if spec.activation_checkpointing:  # backward first recomputes the forward, dispatch included
        a2a[1] += a2a[0]
    dense = (sum(l.params for l in spec.layers) + spec.embed_params + spec.head_params) / plan.pp
    experts = sum(l.expert_params * spec.num_experts for l in spec.layers if l.is_moe) / (plan.pp * plan.ep)
    grad = np.inf
    for p in range(plan.pp):
        groups = [grid[p].ravel()] if cost_model.ep_splits_tokens else [grid[p, :, e] for e in range(plan.ep)]
        t = max(topology.all_reduce_time(dense * grad_bytes, g) for g in groups)
        if plan.dp > 1:
            t += max(topology.all_reduce_time(experts * grad_bytes, grid[p, :, e]) for e in range(plan.ep))
        if topology.tp > 1:  # experts (and norms, router) are whole on every GPU of a TP group
            rep = sum(tpc.replicated_params(l, spec) for l in spec.layers) / plan.pp
            t += tpc.tp_grad_sync_time(np.full(grid[p].shape, (experts + rep) * grad_bytes), topology, grid[p])
        grad = min(grad, t)
    return a2a, float(grad)


def simulate(
    plan: Plan,
    schedule: str,
    microbatches: int,
    topology: Topology,
    cost_model: CostModel,
    routing: Any = None,
    free_comm: bool = False,
    action_overhead_s: Any = 0.0,
    origins: Any = None,
    weight_grad: str = "graph",
) -> SimResult:
    """Simulate one iteration. `routing`: tokens per expert per MoE layer ([n_moe, E] or
    {layer: [E]}; proportions only; None = uniform). `origins`: where those tokens start,
    tokens per source EP rank per expert ([n_moe, ep, E] or {layer: [ep, E]}; per expert only
    the split over sources matters; None = evenly spread). Replicated experts take tokens by
    the runtime's nearest-replica rule, and the all-to-all follows `cost_model.a2a`.
    `free_comm`: all transfers cost nothing.
    `action_overhead_s`: the runtime's fixed cost per action (scalar or per pipeline rank;
    `moepipe.sim.calibrate.fit_action_overhead` measures it), 0 = an ideal runtime.
    `weight_grad`: what a microbatch holds between its I and its W (split backwards):
    "graph" its whole activations (torch's runtime), "lean" each Linear's input and output
    gradient (moepipe's executor with schedule.lean_weight_grad; `weight_grad_mode` picks)."""
    if weight_grad not in ("graph", "lean"):
        raise ConfigError(f"weight_grad={weight_grad!r}: choose graph or lean")
    spec = cost_model.spec
    validate_plan(plan, spec.n_layers, spec.moe_layers, spec.num_experts if spec.moe_layers else None)
    v = plan.n_stages // plan.pp
    if v * plan.pp != plan.n_stages:
        raise ConfigError(f"plan has {plan.n_stages} stages for pp={plan.pp}: use a multiple of pp (virtual stages per rank)")
    order, run_s2r = schedule_order(schedule, plan.pp, v, microbatches)
    chains = schedule_chains(schedule)  # chimera: every plan stage runs twice, once per model replica
    s2r = run_s2r[: len(run_s2r) // chains]
    if list(plan.stage_to_pp_rank) != s2r:
        raise ConfigError(
            f"plan.stage_to_pp_rank={list(plan.stage_to_pp_rank)} does not match schedule.name={schedule} ({s2r}): "
            "build the plan with the schedule's style (loop for interleaved, v for zbv/dualpipev)"
        )
    costs = _for_chains(stage_costs(cost_model, plan, topology, routing, free_comm=free_comm, origins=origins), chains)
    s2r = run_s2r
    res = engine.run(order, s2r, microbatches, costs.comp, costs.a2a, costs.send, action_overhead_s)
    m, S = microbatches, len(s2r)
    versions, flush = order_traits(schedule)
    pipeline = res.makespan
    if not flush:  # PipeDream-2BW: the steady state of back-to-back iterations (no drain)
        pipeline = steady_iteration(schedule, plan.pp, v, m, lambda o, r, k: engine.run(
            o, r, k, costs.comp, costs.a2a, costs.send, action_overhead_s).makespan)
    iteration = pipeline + costs.grad_sync_s
    bubble = 1.0 - float(res.busy.sum()) / (plan.pp * pipeline) if pipeline > 0 else 0.0

    # Device-level compute (per global rank) for idle accounting.
    world = plan.world_size
    busy_dev = np.zeros((plan.pp, plan.dp, plan.ep))
    for s in range(S):  # each replica's stages run m / chains microbatches
        busy_dev[s2r[s]] += m / chains * costs.ep_busy[s].sum(0)
    idle = 1.0 - float(busy_dev.sum()) / (world * iteration) if iteration > 0 else 0.0

    # Peak activation memory: in-flight counts after each forward x bytes per microbatch.
    grid = rank_grid(plan.pp, plan.ep, plan.dp)
    peak_bytes = np.zeros(world)
    lean = weight_grad == "lean" and not spec.activation_checkpointing and costs.lean_w_bytes is not None
    for r, snaps in res.inflight.items():
        held = snaps.astype(np.float64)
        if lean:  # past their I, microbatches hold only what W needs
            past = res.inflight_past_i[r].astype(np.float64)
            b = (held - past) @ costs.act_bytes.reshape(S, -1) + past @ costs.lean_w_bytes.reshape(S, -1)
        else:
            b = held @ costs.act_bytes.reshape(S, -1)  # [k, dp*ep]
        peak_bytes[grid[r].ravel()] = b.max(0)

    work_mb = costs.work.copy()
    if spec.activation_checkpointing:
        work_mb[1] += work_mb[0]
    total_rate = costs.rates.sum()
    lower = float(work_mb.sum() * m * plan.dp / total_rate)
    # Balanced: every action of a phase lasts W_phase * pp / (n_stages * replica throughput).
    replica_rate = costs.rates.sum(axis=(0, 2)).min()
    t_bal = work_mb * plan.pp / (plan.n_stages * replica_rate)  # a replica's stages: plan.n_stages
    bal = engine.run(order, s2r, m, np.tile(t_bal, (S, 1)), np.zeros((S, 3)), np.zeros(S), action_overhead_s)
    a2a_bal, grad_bal = (np.zeros(3), 0.0) if free_comm else balanced_comm_costs(cost_model, plan, topology, plan.n_stages)
    bal_comm = engine.run(order, s2r, m, np.tile(t_bal, (S, 1)), np.tile(a2a_bal, (S, 1)), costs.send, action_overhead_s)
    bal_s, bal_comm_s = bal.makespan, bal_comm.makespan
    if not flush:
        bal_s = steady_iteration(schedule, plan.pp, v, m, lambda o, r, k: engine.run(
            o, r, k, np.tile(t_bal, (S, 1)), np.zeros((S, 3)), np.zeros(S), action_overhead_s).makespan)
        bal_comm_s = steady_iteration(schedule, plan.pp, v, m, lambda o, r, k: engine.run(
            o, r, k, np.tile(t_bal, (S, 1)), np.tile(a2a_bal, (S, 1)), costs.send, action_overhead_s).makespan)

    return SimResult(
        schedule=schedule,
        pp=plan.pp,
        ep=plan.ep,
        dp=plan.dp,
        n_stages=S,
        microbatches=m,
        iteration_time_s=float(iteration),
        pipeline_time_s=float(pipeline),
        grad_sync_s=float(costs.grad_sync_s),
        bubble_fraction=float(bubble),
        idle_fraction=float(idle),
        lower_bound_s=lower,
        balanced_bound_s=float(bal_s),
        balanced_comm_bound_s=float(bal_comm_s + grad_bal),
        peak_activation_bytes=peak_bytes,
        peak_inflight=peak_inflight(res, S),
        a2a_bytes_intra_node=float(costs.a2a_bytes_intra * m),
        a2a_bytes_inter_node=float(costs.a2a_bytes_inter * m),
        p2p_bytes=float(costs.p2p_bytes * m),
        busy_s=res.busy,
        timeline=res.timeline,
        stage_to_pp_rank=s2r,
        costs=costs,
        a2a_mode=cost_model.a2a,
        a2a_messages_intra_node=int(costs.a2a_msgs_intra * m),
        a2a_messages_inter_node=int(costs.a2a_msgs_inter * m),
        weight_versions=versions,
        weight_bytes=versions * weight_params(cost_model, plan, topology.tp, chains) * 4.0,
        flush=flush,
        tp=topology.tp,
    )


def _for_chains(costs: StageCosts, chains: int) -> StageCosts:
    """Per-stage costs of a two-chain schedule's stages: stage n + s (the second replica of
    plan stage s, on the mirrored rank) costs what stage s does."""
    if chains == 1:
        return costs
    rep = {f: np.concatenate([getattr(costs, f)] * chains) for f in ("comp", "a2a", "send", "act_bytes", "ep_busy")
           + (("lean_w_bytes",) if costs.lean_w_bytes is not None else ())}
    return dataclasses.replace(costs, **rep)


def weight_grad_mode(executor: str, lean_weight_grad: bool, activation_checkpointing: bool = False) -> str:
    """The runtime's memory between I and W for `simulate(weight_grad=...)`: "lean" on
    moepipe's executor with schedule.lean_weight_grad (off under activation checkpointing),
    else "graph"."""
    return "lean" if executor == "moepipe" and lean_weight_grad and not activation_checkpointing else "graph"


def weight_params(cost_model: CostModel, plan: Plan, tp: int = 1, chains: int = 1) -> np.ndarray:
    """[world] parameters each device holds (its stages' dense parameters, replicated over EP
    and DP, plus the experts its EP rank holds, replicas included). Under tensor parallelism
    (tp > 1: a device is a TP group) the parameters one GPU of the group holds. With two
    chains (chimera) the stages of both model replicas it runs."""
    spec = cost_model.spec
    grid = rank_grid(plan.pp, plan.ep, plan.dp)  # [pp, dp, ep]
    out = np.zeros(plan.world_size)
    for p in range(plan.pp):
        stages = sorted(set(chain_stages(plan, p, chains).values()))
        layers = [l for s in stages for l in range(*plan.stage_layers[s])]
        dense = sum(tpc.dense_params_per_gpu(spec.layers[l], spec, tp) for l in layers)
        dense += tpc.embed_params_per_gpu(spec, tp) * (0 in stages) + tpc.head_params_per_gpu(spec, tp) * (plan.n_stages - 1 in stages)
        experts = np.zeros(plan.ep)
        for l in layers:
            if spec.layers[l].is_moe:
                for e, owners in enumerate(plan.expert_map[l]):
                    for o in owners:
                        experts[o] += spec.layers[l].expert_params
        for e in range(plan.ep):
            out[grid[p, :, e]] = dense + experts[e]
    return out
