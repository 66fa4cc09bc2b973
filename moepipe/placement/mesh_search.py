"""Which (tp, pp, ep, dp) mesh to run a model on, for a cluster: a small exhaustive search.

`enumerate_meshes` lists the shapes: tp in {1, 2, 4, 8} (a TP group inside a node), pp dividing
the layers, ep dividing the experts, dp = GPUs / (tp pp ep). `search_mesh` gives each the
job's own checks (`config.validate` on the job with that mesh: schedule, batch divisibility,
and, once the runtime's validation knows tp, head divisibility), groups the topology by tp
(`topology.tp_groups`: a TP group that spans nodes is rejected), checks memory per GPU on the
static plan (parameters + AdamW state + the schedule's activation peak, `Evaluator`), then
plans it with the configured placer and simulates one iteration with the configured schedule
(`moepipe.sim.simulate`). Pure: no process group, no files. The moepipe-sim CLI
(`sim.search_mesh=true`) prints the best few and writes them to summary.json;
experiments/fig_tp_mesh.py draws every shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

from moepipe.config import ConfigError, MoepipeConfig, moe_layer_ids, validate
from moepipe.placement.tensor_parallel_cost import TP_SIZES
from moepipe.placement.topology import Topology, tp_groups


@dataclass
class MeshResult:
    tp: int
    pp: int
    ep: int
    dp: int
    feasible: bool
    reason: str = ""  # why not (one line), "" when feasible
    iteration_time_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    peak_memory_bytes: Optional[float] = None  # per GPU, the most loaded one: parameters + AdamW + activation peak
    param_bytes: Optional[float] = None  # on that GPU
    activation_bytes: Optional[float] = None
    memory_capacity_bytes: Optional[float] = None  # the smallest GPU's
    bubble_fraction: Optional[float] = None
    grad_sync_s: Optional[float] = None
    placer: str = ""
    microbatches: Optional[int] = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.tp, self.pp, self.ep, self.dp

    @property
    def label(self) -> str:
        return f"tp{self.tp} pp{self.pp} ep{self.ep} dp{self.dp}"


@dataclass
class MeshSearch:
    gpus: int
    topology: str
    schedule: str
    microbatches: int
    placer: str
    tokens_per_step: int
    microbatch_seqs: Optional[int] = None  # None: every mesh runs `microbatches`
    feasible: list[MeshResult] = field(default_factory=list)  # simulated, fastest first
    rejected: list[MeshResult] = field(default_factory=list)  # with a reason, in enumeration order

    @property
    def best(self) -> Optional[MeshResult]:
        return self.feasible[0] if self.feasible else None

    def to_json(self, top: Optional[int] = None) -> dict[str, Any]:
        best = self.best
        return {
            "gpus": self.gpus, "topology": self.topology, "schedule": self.schedule, "microbatches": self.microbatches,
            "microbatch_seqs": self.microbatch_seqs,
            "placer": self.placer, "tokens_per_step": self.tokens_per_step,
            "chosen": None if best is None else asdict(best),
            "feasible": [asdict(r) for r in (self.feasible if top is None else self.feasible[:top])],
            "n_feasible": len(self.feasible),
            "rejected": [asdict(r) for r in self.rejected],
        }


def enumerate_meshes(gpus: int, n_layers: int, num_experts: int, tp_sizes: Sequence[int] = TP_SIZES) -> list[tuple[int, int, int, int]]:
    """Every (tp, pp, ep, dp) with tp in tp_sizes, pp | n_layers, ep | num_experts (1 for a dense
    model) and tp*pp*ep*dp = gpus."""
    out = []
    eps = [e for e in range(1, num_experts + 1) if num_experts % e == 0] if num_experts else [1]
    for tp in tp_sizes:
        for pp in (p for p in range(1, n_layers + 1) if n_layers % p == 0):
            for ep in eps:
                k = tp * pp * ep
                if gpus % k == 0:
                    out.append((tp, pp, ep, gpus // k))
    return out


def _tp_shape_problem(cfg: MoepipeConfig, tp: int) -> str:
    """What tensor parallelism cannot split evenly (heads, key/value heads, FFN widths)."""
    m, e = cfg.model, cfg.moe
    if m.n_heads % tp or (m.n_kv_heads or m.n_heads) % tp:
        return f"model.n_heads={m.n_heads}/n_kv_heads={m.n_kv_heads or m.n_heads} not divisible by tp={tp}"
    if len(moe_layer_ids(m, e)) < m.n_layers and m.ffn_hidden % tp:
        return f"model.ffn_hidden={m.ffn_hidden} not divisible by tp={tp}"
    if e.num_experts and e.num_shared_experts and (e.shared_expert_hidden or e.expert_hidden) * e.num_shared_experts % tp:
        return f"shared experts' width not divisible by tp={tp}"
    return ""


def with_mesh(cfg: MoepipeConfig, tp: int, pp: int, ep: int, dp: int, microbatch_seqs: Optional[int] = None) -> MoepipeConfig:
    """cfg on that mesh. `microbatch_seqs`: keep the microbatch size (sequences per microbatch per
    pipeline) instead of the count: microbatches = batch_size / (ep dp microbatch_seqs)."""
    # parallel.sp=true applies to the meshes with TP (sequence shards over the TP group)
    out = replace(cfg, parallel=replace(cfg.parallel, tp=tp, pp=pp, ep=ep, dp=dp, sp=bool(cfg.parallel.sp) and tp > 1))
    if microbatch_seqs is not None:
        per = ep * dp * int(microbatch_seqs)
        if cfg.train.batch_size % per:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split into {ep * dp} pipelines x microbatches of {microbatch_seqs} sequences")
        out = replace(out, schedule=replace(cfg.schedule, microbatches=cfg.train.batch_size // per))
    return out


def evaluate_mesh(cfg: MoepipeConfig, topology: Topology, tp: int, pp: int, ep: int, dp: int, placer: Optional[str] = None,
                  workload: Optional[Callable[[MoepipeConfig], tuple]] = None, microbatch_seqs: Optional[int] = None) -> MeshResult:
    """One mesh shape: checked, planned, simulated. `topology` is per GPU (at least tp*pp*ep*dp
    devices). `workload(cfg) -> (expert_load, origins)` for that mesh (None: uniform routing);
    `microbatch_seqs`: see `with_mesh` (None: cfg's schedule.microbatches)."""
    from moepipe.placement.placers import Evaluator, inputs_from_config, make_placement
    from moepipe.placement.placers.inputs import origins_of, routing_of
    from moepipe.sim.simulator import simulate, weight_grad_mode

    name = placer or cfg.placer.name
    out = MeshResult(tp, pp, ep, dp, False, placer=name)
    try:
        c = with_mesh(cfg, tp, pp, ep, dp, microbatch_seqs)
        out.microbatches = c.schedule.microbatches
        problem = _tp_shape_problem(c, tp)
        if problem:
            raise ConfigError(problem)
        c = validate(c)
        groups = tp_groups(topology, tp, pp * ep * dp)
        load, origins = workload(c) if workload is not None else (None, None)
        inputs = inputs_from_config(c, groups, expert_load=load, origins=origins)
        ev = Evaluator(inputs)
        mem = ev.evaluate(ev.static_plan())
        cap = float(ev.mem.min())
        out.memory_capacity_bytes = cap
        need = mem.memory_bytes
        r = int(need.argmax())
        out.peak_memory_bytes, out.param_bytes, out.activation_bytes = float(need[r]), float(mem.param_bytes[r]), float(mem.act_bytes[r])
        if need[r] > cap:
            raise ConfigError(f"needs {need[r] / 1e9:.2f} GB per GPU (parameters+AdamW {mem.param_bytes[r] / 1e9:.2f}, "
                              f"activations {mem.act_bytes[r] / 1e9:.2f}) > {cap / 1e9:.2f} GB")
        plan = make_placement(name, inputs, c.placer.replica_slots, evaluator=ev)
    except ConfigError as err:
        out.reason = str(err).splitlines()[0]
        return out
    res = simulate(plan, c.schedule.name, c.schedule.microbatches, inputs.topology, ev.cm, routing_of(inputs), c.sim.free_comm,
                   origins=origins_of(inputs),
                   weight_grad=weight_grad_mode(c.schedule.executor, c.schedule.lean_weight_grad, c.train.activation_checkpointing))
    final = ev.evaluate(plan).memory_bytes
    r = int(final.argmax())
    out.peak_memory_bytes = float(final[r])
    out.param_bytes, out.activation_bytes = float(ev.evaluate(plan).param_bytes[r]), float(ev.evaluate(plan).act_bytes[r])
    out.feasible = True
    out.iteration_time_s = float(res.iteration_time_s)
    out.tokens_per_s = c.train.batch_size * c.train.seq_len / res.iteration_time_s
    out.bubble_fraction, out.grad_sync_s = float(res.bubble_fraction), float(res.grad_sync_s)
    return out


def search_mesh(cfg: MoepipeConfig, topology: Topology, placer: Optional[str] = None, gpus: Optional[int] = None,
                tp_sizes: Sequence[int] = TP_SIZES, workload: Optional[Callable[[MoepipeConfig], tuple]] = None,
                microbatch_seqs: Optional[int] = None) -> MeshSearch:
    """Every mesh of `gpus` GPUs (default: all of the per-GPU `topology`) for cfg's model, schedule
    and batch, simulated with `placer` (default cfg.placer.name). Feasible ones fastest first
    (ties: smaller tp, then pp, ep); the first is the chosen mesh. The microbatch count is the
    config's, or with `microbatch_seqs` whatever keeps that many sequences per microbatch."""
    n = topology.n_devices if gpus is None else int(gpus)
    if n > topology.n_devices:
        raise ConfigError(f"mesh search over {n} GPUs > topology devices={topology.n_devices} (topology={topology.name}): pick a larger topology")
    E = cfg.moe.num_experts if moe_layer_ids(cfg.model, cfg.moe) else 0
    out = MeshSearch(n, topology.name, cfg.schedule.name, cfg.schedule.microbatches, placer or cfg.placer.name,
                     cfg.train.batch_size * cfg.train.seq_len, microbatch_seqs)
    for shape in enumerate_meshes(n, cfg.model.n_layers, E, tp_sizes):
        r = evaluate_mesh(cfg, topology, *shape, placer=placer, workload=workload, microbatch_seqs=microbatch_seqs)
        (out.feasible if r.feasible else out.rejected).append(r)
    out.feasible.sort(key=lambda r: (r.iteration_time_s, r.tp, r.pp, r.ep))
    return out


def format_table(search: MeshSearch, top: Optional[int] = None) -> str:
    """The best `top` feasible meshes as a text table, the chosen one marked."""
    rows = search.feasible if top is None else search.feasible[:top]
    m = search.microbatches if search.microbatch_seqs is None else f"{search.microbatch_seqs} seq/microbatch"
    lines = [f"mesh search: {search.gpus} GPUs on {search.topology}, schedule={search.schedule} m={m} "
             f"placer={search.placer}: {len(search.feasible)} feasible, {len(search.rejected)} rejected",
             f"{'':2}{'tp':>3} {'pp':>3} {'ep':>3} {'dp':>4} {'m':>4} {'step_s':>10} {'tokens/s':>12} {'peak_GB/GPU':>12} {'bubble':>7}"]
    for i, r in enumerate(rows):
        lines.append(f"{'*' if i == 0 else ' ':2}{r.tp:>3} {r.pp:>3} {r.ep:>3} {r.dp:>4} {r.microbatches:>4} {r.iteration_time_s:>10.4g} "
                     f"{r.tokens_per_s:>12.4g} {r.peak_memory_bytes / 1e9:>12.1f} {r.bubble_fraction:>7.3f}")
    best = search.best
    lines.append("chosen: none fits" if best is None else f"chosen: {best.label} (tokens/s {best.tokens_per_s:.4g})")
    return "\n".join(lines)
