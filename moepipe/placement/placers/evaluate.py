"""Fast, exact evaluation of plans for the placers.

`moepipe.sim.simulate` recomputes everything per plan with Python loops over layers; a placer
compares many plans of one job, so this module computes the same per-stage costs
(`cost_model.stage_costs`) with the plan-independent parts cached and the per-layer work
vectorised over layers and pipeline ranks, then runs the event engine without its timeline
(`engine.makespan`: the same makespan bit for bit). The iteration time
and the activation peak equal simulate()'s (tests/test_placers.py checks this).

It also gives the per-(layer, pp rank) times the partition search works on, and the memory a
plan needs on every device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from moepipe.config import ConfigError
from moepipe.placement import tensor_parallel_cost as tpc
from moepipe.placement.cost_model import (
    ClassSums, _flat_holders, _grad_sync, class_sums_time, exchange_time, exchange_traffic, layer_exchange, rule_local_size, rule_nodes, uniform_exchanges,
    uniform_links,
)
from moepipe.placement.plan import Plan, rank_grid, stage_pp_ranks
from moepipe.placement.placers.inputs import BYTES_PER_PARAM_TRAIN, PlacementInputs, effective_cost_model, load_fractions, origin_fractions
from moepipe.sim import engine
from moepipe.sim.schedules import schedule_chains, schedule_order

GRAD_BYTES = 4  # fp32 gradients in the data-parallel all-reduce (as the simulator)


@dataclass
class Evaluation:
    iteration_time_s: float
    param_bytes: np.ndarray  # [world] parameters + AdamW state held
    act_bytes: np.ndarray  # [world] activation peak
    inflight: np.ndarray  # [n_stages] most microbatches a stage holds at once

    @property
    def memory_bytes(self) -> np.ndarray:
        return self.param_bytes + self.act_bytes


LAYER_EXCH_CACHE_BYTES = 64 << 20  # Evaluator.layer_exchange's memo: at most about this much per evaluator


class Evaluator:
    """Everything about one job that does not depend on the plan, cached."""

    def __init__(self, inputs: PlacementInputs):
        self.inputs = inputs
        self.cm = cm = effective_cost_model(inputs)
        self.spec = spec = cm.spec
        self.topo = topo = inputs.topology
        pp, ep, dp = inputs.pp, inputs.ep, inputs.dp
        if topo.n_devices < pp * ep * dp:
            raise ConfigError(f"parallel.pp*ep*dp={pp * ep * dp} > topology devices={topo.n_devices}: pick a larger topology")
        self.grid = rank_grid(pp, ep, dp)  # [pp, dp, ep]
        self.rates = cm.rate(topo, self.grid)  # [pp, dp, ep]
        self.order, run_s2r = schedule_order(inputs.schedule, pp, inputs.virtual_stages, inputs.microbatches)
        # a plan's stages; a two-chain schedule (chimera) runs each twice, the copy on the mirrored rank
        self.chains = schedule_chains(inputs.schedule)
        self.run_s2r = run_s2r
        self.s2r = run_s2r[: len(run_s2r) // self.chains]
        self.n_stages = len(self.s2r)
        self.frac = load_fractions(inputs)  # [n_moe, E]
        self.origin_share = origin_fractions(inputs)  # [n_moe, ep, E] or None (tokens start evenly spread)
        self.rule_nodes = rule_nodes(ep, rule_local_size(topo))  # the replica rule's node per EP rank
        self.moe = list(spec.moe_layers)
        self.moe_row = {l: i for i, l in enumerate(self.moe)}
        self.is_moe = np.array([l.is_moe for l in spec.layers], dtype=bool)
        T = spec.tokens_per_microbatch
        self.T_e = T / ep if cm.ep_splits_tokens else T
        self.assign = T * spec.top_k  # token-expert assignments per microbatch per layer
        self.loads = self.frac * self.assign  # [n_moe, E]
        self.bpt = spec.hidden_bytes_per_token
        self.dense_params = np.array([l.params for l in spec.layers], dtype=np.float64)
        self.expert_params = np.array([l.expert_params for l in spec.layers], dtype=np.float64)
        self.mem = np.array([d.memory_bytes for d in topo.devices], dtype=np.float64)[: pp * ep * dp]
        # dense (non-expert) seconds per layer on every member, [L, pp, 3, dp, ep], with the block's
        # TP collectives when a device is a TP group (topology.tp > 1; tensor_parallel_cost)
        self.dense_t = cm.dense_work[:, None, :, None, None] * self.T_e / self.rates[None, :, None]
        self.tp = topo.tp
        if self.tp > 1:
            self.dense_t = self.dense_t + np.moveaxis(tpc.tp_block_seconds_on(spec, self.T_e, topo, self.grid), 0, 1)[None]
        # EP groups whose links are identical (same bandwidths, latencies, node layout) have the
        # same all-to-all time: dispatch_time runs once per class, not once per (pp, dp) group
        classes: dict = {}
        self.group_class = np.zeros((pp, dp), dtype=np.int64)
        self.class_group: list[np.ndarray] = []  # one representative group per class
        for p in range(pp):
            for d in range(dp):
                g = self.grid[p, d]
                ix = np.ix_(g, g)
                node = topo.node_of[g]
                key = (topo.bandwidth[ix].tobytes(), topo.latency[ix].tobytes(), (node[:, None] == node[None, :]).tobytes())
                if key not in classes:
                    classes[key] = len(classes)
                    self.class_group.append(g)
                self.group_class[p, d] = classes[key]
        # even origins, flat all-to-all, and links alike within each class: the rule's closed form
        # (`uniform_exchanges`) replaces the [ep, ep] token matrices (same times to rounding)
        links = [uniform_links(topo, g, self.rule_nodes) for g in self.class_group] if ep > 1 else []
        self.class_links = links if self.origin_share is None and cm.a2a == "flat" and all(x is not None for x in links) else None
        self._inflight: Optional[np.ndarray] = None
        self._memo: dict = {}
        self._exch: dict = {}
        self._evals: dict = {}
        self._held: dict = {}
        self._layer_exch: dict = {}
        self._extras = None
        self._static: Optional[Plan] = None

    # ------------------------------------------------------------------ per-layer times
    def exchanges(self, plan: Plan) -> tuple[np.ndarray, list]:
        """(routed [n_moe, ep] token-expert assignments per microbatch on each EP rank, per layer
        the [ep, ep] source -> destination tokens, or None for the even pattern, or its ClassSums
        (even origins on uniform links: `class_links`)): the runtime's nearest-replica rule on the
        inputs' origins (cost_model.layer_exchange, as the simulator).
        Memoised on the expert map object (plans are treated as immutable)."""
        key = id(plan.expert_map)
        hit = self._exch.get(key)
        if hit is not None and hit[0] is plan.expert_map:
            return hit[1], hit[2]
        if self.class_links is not None and self.moe:
            out, tokens = uniform_exchanges([plan.expert_map[l] for l in self.moe], self.frac, self.assign, self.rule_nodes)
        else:
            out = np.zeros((len(self.moe), plan.ep))
            tokens = []
            for li, l in enumerate(self.moe):
                out[li], t = self.layer_exchange(li, plan.expert_map[l])
                tokens.append(t)
        if len(self._exch) > 16:
            self._exch.clear()
        self._exch[key] = (plan.expert_map, out, tokens)
        return out, tokens

    def layer_exchange(self, li: int, holders: list) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """cost_model.layer_exchange of MoE layer row li under these holder lists, on the
        inputs' origins; memoised on the lists' identity (a placer scores a layer's chosen
        packing, then the evaluator its plan: treat the lists as immutable)."""
        key = (li, id(holders))
        hit = self._layer_exch.get(key)
        if hit is not None and hit[0] is holders:
            return hit[1], hit[2]
        share = None if self.origin_share is None else self.origin_share[li]
        routed, tok = layer_exchange(holders, self.frac[li], self.assign, self.rule_nodes, share)
        # bounded by entries and by bytes: with origins each entry holds an [ep, ep] token matrix
        # (ep=128: 128 KiB), and the robust placer keeps one Evaluator per scenario
        if len(self._layer_exch) >= max(16, min(4096, LAYER_EXCH_CACHE_BYTES // max(1, 8 * routed.size * routed.size))):
            self._layer_exch.clear()
        self._layer_exch[key] = (holders, routed, tok)
        return routed, tok

    def traffic(self, plan: Plan) -> dict:
        """All-to-all bytes per iteration by link class, as the simulator counts them
        (`SimResult.a2a_bytes_intra_node/inter_node`): every MoE layer's dispatch + combine on its
        stage's EP groups (each dp replica), forward and backward (and the recomputed forward),
        times the microbatches, under the nearest-replica rule and the inputs' origins."""
        routed, tokens = self.exchanges(plan)
        passes = 2 * (3 if self.spec.activation_checkpointing else 2)
        intra = inter = 0.0
        if self.inputs.ep > 1:
            for li, l in enumerate(self.moe):
                p = plan.stage_to_pp_rank[plan.stage_of_layer(l)]
                t = tokens[li]
                tok = None if t is None or isinstance(t, ClassSums) else t * self.bpt
                seen: dict = {}
                for d in range(self.inputs.dp):
                    c = int(self.group_class[p, d])
                    if c in seen:
                        pass
                    elif isinstance(t, ClassSums):  # bytes sent inside / across nodes
                        seen[c] = (float(t.send[0].sum()) * self.bpt, float(t.send[1].sum()) * self.bpt)
                    else:
                        seen[c] = exchange_traffic(tok, routed[li] * self.bpt, self.class_group[c], self.topo, self.cm.a2a)[:2]
                    intra += seen[c][0]
                    inter += seen[c][1]
        m = self.inputs.microbatches * passes
        return {"a2a_bytes_intra_node": intra * m, "a2a_bytes_inter_node": inter * m}

    def routed(self, plan: Plan) -> np.ndarray:
        """[n_moe, ep] token-expert assignments per microbatch on each EP rank."""
        return self.exchanges(plan)[0]

    def _layers_of(self, plan: Plan):
        """(routed, (comp, a2a)) of a plan's expert map, memoised on the map object (placers
        evaluate many partitions of one expert placement)."""
        key = id(plan.expert_map)
        hit = self._memo.get(key)
        if hit is None or hit[0] is not plan.expert_map:
            routed, tokens = self.exchanges(plan)
            hit = (plan.expert_map, routed, self.layer_times(routed, tokens))
            if len(self._memo) > 16:
                self._memo.clear()
            self._memo[key] = hit
        return hit[1], hit[2]

    def layer_times(self, routed: np.ndarray, tokens: Optional[list] = None) -> tuple[np.ndarray, np.ndarray]:
        """(comp [L, pp, 3, dp]: slowest EP member per layer, a2a [L, pp, dp]: dispatch + combine
        of one phase) for a given routed-token table, on every pipeline rank. `tokens` (from
        `exchanges`): per layer source -> destination tokens; None: tokens start evenly spread."""
        cm, L = self.cm, self.spec.n_layers
        t = self.dense_t.copy()
        if self.moe:
            idx = np.array(self.moe)
            t[idx] += cm.expert_work[idx][:, None, :, None, None] * routed[:, None, None, None, :] / self.rates[None, :, None]
        comp = t.max(-1)
        a2a = np.zeros((L, self.inputs.pp, self.inputs.dp))
        if self.moe and self.inputs.ep > 1:
            if cm.a2a == "flat" and (tokens is None or all(t is None for t in tokens)):
                per_class = np.stack([2 * np.atleast_1d(self.topo.dispatch_time(routed * self.bpt, g)) for g in self.class_group], -1)
            elif any(isinstance(t, ClassSums) for t in tokens):  # uniform_exchanges: each row by its form
                rows = np.array([isinstance(t, ClassSums) for t in tokens])
                per_class = np.zeros((len(self.moe), len(self.class_group)))
                sums = [t for t in tokens if t is not None]
                for j, (g, links) in enumerate(zip(self.class_group, self.class_links)):
                    if (~rows).any():
                        per_class[~rows, j] = 2 * np.atleast_1d(self.topo.dispatch_time(routed[~rows] * self.bpt, g))
                    per_class[rows, j] = class_sums_time(sums, self.bpt, links)
            else:
                tokens = [None] * len(self.moe) if tokens is None else tokens
                per_class = np.array([[exchange_time(None if t is None else t * self.bpt, r * self.bpt, g, self.topo, cm.a2a) for g in self.class_group]
                                      for r, t in zip(routed, tokens)])
            a2a[self.moe] = per_class[:, self.group_class]  # [n_moe, pp, dp]
        return comp, a2a

    def extras(self) -> tuple[np.ndarray, np.ndarray]:
        """Embedding (first stage) and head (last stage) seconds, [pp, 3, dp] each."""
        if self._extras is not None:
            return self._extras
        cm = self.cm
        emb = (cm.embed_work[None, :, None, None] * self.T_e / self.rates[:, None]).max(-1)
        head = (cm.head_work[None, :, None, None] * self.T_e / self.rates[:, None]).max(-1)
        self._extras = (emb, head)
        return emb, head

    # ------------------------------------------------------------------ stage costs (= cost_model.stage_costs)
    def stage_costs(self, plan: Plan, routed: Optional[np.ndarray] = None):
        routed = self.routed(plan) if routed is None else routed
        comp_l, a2a_l = self.layer_times(routed)
        return self.stage_costs_from(plan.stage_layers, comp_l, a2a_l, routed)

    def stage_costs_from(self, stage_layers, comp_l, a2a_l, routed):
        spec, S, s2r = self.spec, self.n_stages, self.s2r
        emb, head = self.extras()
        Pc = np.concatenate([np.zeros((1,) + comp_l.shape[1:]), np.cumsum(comp_l, 0)])
        Pa = np.concatenate([np.zeros((1,) + a2a_l.shape[1:]), np.cumsum(a2a_l, 0)])
        comp = np.zeros((S, 3))
        a2a = np.zeros((S, 3))
        for s, (a, b) in enumerate(stage_layers):
            p = s2r[s]
            c = Pc[b, p] - Pc[a, p]  # [3, dp]
            if s == 0:
                c = c + emb[p]
            if s == S - 1:
                c = c + head[p]
            comp[s] = c.max(-1)
            a2a[s, 0] = a2a[s, 1] = (Pa[b, p] - Pa[a, p]).max()
        if spec.activation_checkpointing:
            comp[:, 1] += comp[:, 0]
            a2a[:, 1] += a2a[:, 0]
        send = np.zeros(S)
        for s in range(S - 1):
            p, q = s2r[s], s2r[s + 1]
            if p != q:
                send[s] = float(np.max(self.topo.p2p_time(self.T_e * self.bpt, self.grid[p], self.grid[q])))
        return comp, a2a, send

    def act_bytes_per_mb(self, stage_layers, routed: np.ndarray) -> np.ndarray:
        """[S, ep] activation bytes one in-flight microbatch keeps on each EP member of a stage."""
        spec = self.spec
        tp, sp = self.tp, self.cm.sequence_parallel  # under TP: per GPU of the group
        per_layer = np.array([tpc.act_elems_per_gpu(l, spec, tp, sp) for l in spec.layers])[:, None] * self.T_e * spec.dtype_bytes * np.ones((1, self.inputs.ep))
        if self.moe:
            per_layer[self.moe] += (np.array([spec.layers[l].expert_act_elems for l in self.moe])[:, None] * routed * tpc.expert_share_per_gpu(tp)
                                    * spec.dtype_bytes)
        P = np.concatenate([np.zeros((1, self.inputs.ep)), np.cumsum(per_layer, 0)])
        out = np.array([P[b] - P[a] for a, b in stage_layers])
        out[-1] += tpc.head_act_elems_per_gpu(spec, tp, sp) * self.T_e * spec.dtype_bytes
        return out

    def param_bytes(self, plan: Plan) -> np.ndarray:
        """[world] bytes of parameters + AdamW state each global rank holds (under TP: each GPU of the group)."""
        spec, pp, ep, dp, tp = self.spec, plan.pp, plan.ep, plan.dp, self.tp
        held = self.copies_held(plan)
        per = np.zeros((pp, ep))
        for s, (a, b) in enumerate(plan.stage_layers):
            for p in stage_pp_ranks(plan, s, self.chains):  # chimera: both replicas' copies
                per[p] += self.dense_params[a:b].sum() if tp == 1 else sum(tpc.dense_params_per_gpu(spec.layers[l], spec, tp) for l in range(a, b))
                if s == 0:
                    per[p] += tpc.embed_params_per_gpu(spec, tp)
                if s == plan.n_stages - 1:
                    per[p] += tpc.head_params_per_gpu(spec, tp)
                for l in range(a, b):
                    if l in self.moe_row:
                        per[p] += held[self.moe_row[l]] * self.expert_params[l]
        out = np.zeros(pp * ep * dp)
        for d in range(dp):
            out[self.grid[:, d, :]] = per
        return out * BYTES_PER_PARAM_TRAIN

    def copies_held(self, plan: Plan) -> np.ndarray:
        """[n_moe, ep] expert copies each EP rank holds per MoE layer, memoised on the map object."""
        key = id(plan.expert_map)
        hit = self._held.get(key)
        if hit is not None and hit[0] is plan.expert_map:
            return hit[1]
        n, E = len(self.moe), self.spec.num_experts
        lens, ranks = _flat_holders([plan.expert_map[l] for l in self.moe], n * E)  # shared with uniform_exchanges' cache
        row = np.repeat(np.arange(n * E) // max(E, 1), lens)
        out = np.bincount(row * plan.ep + ranks, minlength=n * plan.ep).reshape(n, plan.ep).astype(np.float64)
        if len(self._held) > 16:
            self._held.clear()
        self._held[key] = (plan.expert_map, out)
        return out

    def grad_sync(self, plan: Plan) -> float:
        """The simulator's data-parallel gradient all-reduce time after the pipeline drains."""
        return _grad_sync(self.cm, plan, self.topo, self.grid, GRAD_BYTES)

    # ------------------------------------------------------------------ whole plan
    def evaluate(self, plan: Plan) -> Evaluation:
        """The plan's Evaluation, memoised on (stage_layers, expert map object): plans are treated
        as immutable, and placers evaluate the same layout more than once (the static plan)."""
        key = (tuple(map(tuple, plan.stage_layers)), id(plan.expert_map))
        hit = self._evals.get(key)
        if hit is not None and hit[0] is plan.expert_map and list(plan.stage_to_pp_rank) == self.s2r:
            return hit[1]
        res = self._evaluate(plan)
        if len(self._evals) > 64:
            self._evals.clear()
        self._evals[key] = (plan.expert_map, res)
        return res

    def _evaluate(self, plan: Plan) -> Evaluation:
        if list(plan.stage_to_pp_rank) != self.s2r:
            raise ConfigError(f"plan.stage_to_pp_rank={list(plan.stage_to_pp_rank)} does not match schedule {self.inputs.schedule} ({self.s2r}): "
                              "build the plan with the schedule's style")
        routed, (comp_l, a2a_l) = self._layers_of(plan)
        comp, a2a, send = (np.concatenate([x] * self.chains) for x in self.stage_costs_from(plan.stage_layers, comp_l, a2a_l, routed))
        res = engine.makespan(self.order, self.run_s2r, self.inputs.microbatches, comp, a2a, send)  # = engine.run's, without the timeline
        act_mb = np.concatenate([self.act_bytes_per_mb(plan.stage_layers, routed)] * self.chains)  # [chains * S, ep]
        act = np.zeros(plan.world_size)
        for r, snaps in res.inflight.items():
            peak = (snaps.astype(np.float64) @ act_mb).max(0)  # [ep]; every dp replica holds the same
            act[self.grid[r].ravel()] = np.tile(peak, plan.dp)
        inflight = np.zeros(self.n_stages, dtype=np.int64)
        for snaps in res.inflight.values():  # per plan stage: the larger of its replicas
            inflight = np.maximum(inflight, snaps.max(0).reshape(self.chains, -1).max(0))
        if self._inflight is None:
            self._inflight = inflight
        return Evaluation(float(res.makespan + self.grad_sync(plan)), self.param_bytes(plan), act, inflight)

    def static_plan(self) -> Plan:
        """The job's static plan, one object per evaluator (so its evaluation is shared)."""
        if self._static is None:
            from moepipe.placement.plan import static_plan

            i = self.inputs
            self._static = static_plan(self.spec.n_layers, self.moe, self.spec.num_experts, i.pp, i.ep, i.virtual_stages, i.style, i.dp)
        return self._static

    def inflight_estimate(self) -> np.ndarray:
        """Microbatches in flight per stage (depends on the schedule, barely on the plan)."""
        if self._inflight is None:
            self.evaluate(self.static_plan())
        return self._inflight
