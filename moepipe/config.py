"""Structured configuration: dataclasses registered in Hydra's ConfigStore, plus
validation that turns bad values into one clear line naming the field and the fix.

The YAML files under conf/ are the menu; these dataclasses are the schema they are
checked against (types at compose time, semantics in `validate`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moepipe.plugins.builtins import BUILTINS, builtin_names

# Built-in names; placers, forecasters, workloads, schedules and backends are open to plug-ins
# (moepipe.plugins), so validation asks the registry, not these tuples.
SCHEDULES = builtin_names("schedule")
MULTI_STAGE_SCHEDULES = tuple(n for n, spec in BUILTINS["schedule"].items() if spec.multi_stage)
PLACERS = builtin_names("placer")
FORECASTERS = builtin_names("forecaster")
OBJECTIVES = ("mean", "expected", "quantile")  # placer.objective (placement/placers/robust.py)
MOE_BACKENDS = builtin_names("moe_backend")
SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "score")
AUX_LOSS_TYPES = ("switch", "top1")
DATASETS = ("stdlib_bytes", "memmap")
LOGGERS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
DTYPES = ("auto", "fp32", "bf16")
A2A_MODES = ("flat", "hierarchical")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message is one line: field, problem, fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no grouped-query attention)
    ffn_hidden: int = 512  # hidden size of the dense (non-MoE) SwiGLU blocks
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class MoEConfig:
    num_experts: int = 8  # 0 turns the model dense
    top_k: int = 2
    expert_hidden: int = 256
    every: int = 1  # block i is MoE when i >= first_dense and (i - first_dense) % every == every - 1
    first_dense: int = 0  # leading dense blocks (DeepSeek style)
    capacity_factor: float = 0.0  # >0 capped, 0 dropless, <0 busiest-expert-need capped at |cf| (Tutel)
    drop_policy: str = "position"  # which assignments survive a capacity cap: k-major order, or router score
    score_func: str = "softmax"
    normalize_weights: bool = True  # renormalise the k (>1) chosen weights to sum to one
    normalize_after_drop: bool = False  # renormalise over the choices that survived capacity (GShard/fairscale)
    router_jitter: float = 0.0  # multiplicative input noise in training (Switch Transformer)
    aux_loss_coef: float = 0.01
    aux_loss_type: str = "switch"  # switch: count all k choices; top1: GShard/fairscale (first choice only)
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # >0 enables the aux-loss-free expert bias (DeepSeek-V3)
    num_shared_experts: int = 0
    shared_expert_hidden: Optional[int] = None  # None: expert_hidden
    backend: str = "native"


@dataclass
class ParallelConfig:
    pp: int = 1
    ep: int = 1
    dp: int = 1
    # Tensor parallelism (innermost in the mesh: a TP group is tp consecutive ranks, inside a
    # node): attention heads and dense/shared FFN widths split over tp ranks; routed experts use EP
    tp: int = 1
    # Sequence parallelism over the TP group (parallel.tp >= 2): between the split attention and
    # FFNs, every activation (norms, residual, MoE routing, pipeline messages, head and loss)
    # holds seq_len/tp positions; all-gather before and reduce-scatter after each split module
    sp: bool = False
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    # Expert all-to-all: flat (one exchange over the EP group) or hierarchical (within each
    # node, then across nodes among ranks with the same local index: Tutel's 2DH order)
    a2a: str = "flat"
    collective_timeout_s: float = 300.0


@dataclass
class ScheduleConfig:
    name: str = "1f1b"
    microbatches: int = 1
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedules)
    # what runs the schedule's actions: torch's schedule classes, or moepipe's executor
    # (parallel/executor.py: also runs file:<path> tables and specs without a torch class)
    executor: str = "torch"
    # executor=moepipe, schedules with split backwards (I, W): keep only each Linear's input and
    # output gradient from I to W instead of the whole autograd graph (parallel/weight_grad.py);
    # torch's classes always keep the graph; off under train.activation_checkpointing
    lean_weight_grad: bool = True


@dataclass
class PlacerConfig:
    name: str = "static"
    interval: int = 0  # re-plan every N steps; 0 never re-plans
    replica_slots: int = 0  # extra expert slots per EP rank per MoE layer (above ceil(E/ep)) for replicas of hot experts
    min_gain_frac: float = 0.02  # migrate only when the predicted per-step saving exceeds this fraction (hysteresis)
    ema_decay: float = 0.8  # weight of the past in the EMA of expert load and block times the placer reads
    forecast: str = "ema"  # expert-load forecast the placer plans for: ema | last | window | trend | periodic | a plug-in (pkg.module:attr)
    # steps of expert-load history per MoE layer the forecaster reads (ema folds every step and
    # keeps none); periodic finds periods up to half of it
    forecast_window: int = 64
    # what the placer optimises over the forecast's load scenarios: mean (the time at the mean
    # load) | expected (the scenarios' weighted mean time) | quantile (their placer.quantile)
    objective: str = "mean"
    quantile: float = 0.9
    # the fast path of two-speed placement: per-step shadow copies of hot experts, decided from the
    # last step's counts (weights from the home once per step, gradients back once after the last
    # backward; no optimizer state moves), at most this many per EP rank per MoE layer (the memory
    # bound); 0 turns it off (moepipe/model/shadow_exchange.py)
    shadow_slots: int = 0
    # with shadows on, each re-plan that keeps the layout doubles the gap to the next one, up to
    # this many x placer.interval (the fast path is covering the load and a solve costs the ranks
    # time); a migration returns to every placer.interval steps. 1 re-plans every interval
    shadow_backoff: int = 8
    # One process only: advise for this [pp, ep, dp] mesh (the re-plans it would make there,
    # from this run's routing statistics); null advises for the one-device job itself
    advise_mesh: Optional[list[int]] = None


@dataclass
class DeviceGroupConfig:
    """A run of identical devices; heterogeneous clusters list several."""

    count: int = 1
    name: str = "cpu"
    tflops: float = 0.1  # sustained dense matmul throughput in the training dtype
    memory_gb: float = 8.0
    speed: float = 1.0  # relative compute speed multiplier (emulation and what-if studies)
    # Optional per-group link figures (GB/s per direction), overriding the topology-wide ones;
    # a link between two groups runs at the slower end (e.g. A100 HDR vs H100 NDR nodes).
    intra_node_bw_gbps: Optional[float] = None
    inter_node_bw_gbps: Optional[float] = None


@dataclass
class TopologyConfig:
    name: str = "local_cpu"
    nodes: int = 1
    devices_per_node: int = 4
    device_groups: list[DeviceGroupConfig] = field(default_factory=lambda: [DeviceGroupConfig(count=4)])
    intra_node_bw_gbps: float = 10.0  # GB/s, per direction
    intra_node_latency_us: float = 20.0
    inter_node_bw_gbps: float = 1.0
    inter_node_latency_us: float = 50.0
    # Optional full matrices (devices x devices), overriding the intra/inter figures.
    bandwidth_matrix_gbps: Optional[list[list[float]]] = None
    latency_matrix_us: Optional[list[list[float]]] = None
    detect: bool = False  # derive node grouping and device properties at run time
    probe: bool = False  # measure point-to-point and all-to-all bandwidth on the real group


@dataclass
class DataConfig:
    name: str = "stdlib_bytes"
    path: Optional[str] = None  # memmap: the token file
    token_dtype: str = "uint16"  # memmap: uint16 or uint32
    vocab_size: Optional[int] = None  # memmap: tokens are < vocab_size; None reads it from the .json beside the file
    val_fraction: float = 0.05
    max_bytes: Optional[int] = None  # stdlib_bytes: cap on corpus size (None: all files)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "moepipe"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    dir: Optional[str] = None  # None: the run directory


@dataclass
class LoggerConfig:
    name: str = "none"
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: str = "auto"  # auto: rich bar on a terminal, plain lines otherwise; or rich | plain | none


@dataclass
class TrainConfig:
    steps: int = 300
    seed: int = 0
    batch_size: int = 16  # sequences per optimizer step (global, before data parallelism)
    seq_len: int = 128
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    num_threads: int = 0  # torch intra-op threads per process; 0 leaves torch's default
    out_dir: Optional[str] = None  # None: Hydra's run directory
    # Checkpoints (docs/ARCHITECTURE.md, "Checkpoints and restarts").
    ckpt_every: int = 0  # save every N steps and at the last step; 0: only on SIGTERM
    ckpt_dir: Optional[str] = None  # None: <run dir>/ckpt
    ckpt_keep: int = 2  # complete checkpoints kept (oldest deleted first); 0 keeps all
    resume: str = "auto"  # auto: from <ckpt_dir>/latest when present | never | a checkpoint, ckpt or run dir
    max_restarts: int = 0  # moepipe's launcher respawns all workers this often after a crash
    on_nonfinite: str = "stop"  # a non-finite loss: stop the run, or skip the step's update


@dataclass
class SimConfig:
    """`moepipe-sim` options (the simulator reads the rest of the config like training does)."""

    routing: str = "uniform"  # uniform | zipf: tokens per expert ~ 1/rank^zipf_s, experts shuffled per layer
    zipf_s: float = 1.0
    seed: int = 0
    efficiency: float = 0.5  # fraction of the devices' sustained FLOP/s a layer reaches
    free_comm: bool = False  # all transfers cost nothing (isolate the schedule's bubble)
    profile: Optional[str] = None  # measured profile JSON (docs/SIMULATOR.md) instead of analytic costs
    out_trace: bool = True  # write trace.json and gantt.png
    # search (tp, pp, ep, dp) meshes for this model on the whole topology (moepipe.placement.mesh_search)
    # with the configured schedule and placer; print the best search_top and write them to summary.json
    search_mesh: bool = False
    search_top: int = 5


@dataclass
class WorkloadConfig:
    """Injected, labelled routing skews and emulated slow devices for placement studies.

    kind != none adds log(p_e * E) to every router's logits, where p is
    moepipe.placement.workloads.expert_distribution(kind, step, layer, ...): a deterministic
    function of (step, layer), so every layout sees the same routing. Off by default.
    """

    kind: str = "none"  # none | zipf | hot_expert | hot_rank | rotating | burst | lognormal | local_hot | a plug-in (pkg.module:attr)
    strength: float = 1.0
    period: int = 50  # rotating: steps between hotspot moves
    burst_every: int = 10  # burst: a hotspot on every k-th step
    seed: int = 0
    # Make each worker as slow as its topology device's `speed` says (sleep (1/speed - 1) x its
    # measured block compute, forward and input-gradient backward); CPU heterogeneity studies.
    emulate_speed: bool = False


WORKLOAD_KINDS = builtin_names("workload")


@dataclass
class MoepipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    placer: PlacerConfig = field(default_factory=PlacerConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    experiment_name: str = "default"


def register_configs() -> None:
    """Register the schema so conf/config.yaml can name it in its defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="moepipe_schema", node=MoepipeConfig)


# ----------------------------------------------------------------------------- validation


def _one_of(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not known: choose one of {', '.join(map(str, allowed))}")


def _positive(path: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        need = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}={value} must be {need}: set a {'non-negative' if allow_zero else 'positive'} value")


def moe_layer_ids(model: ModelConfig, moe: MoEConfig) -> list[int]:
    """Indices of the blocks whose FFN is a mixture of experts."""
    if moe.num_experts == 0:
        return []
    return [i for i in range(model.n_layers) if i >= moe.first_dense and (i - moe.first_dense) % moe.every == moe.every - 1]


def _plugin(kind: str, value: str) -> Any:
    """The registry's plug-in `value` of `kind` (built-in, import path, registered or entry point);
    its one-line ConfigError names the field, the known names and how to add one."""
    from moepipe.plugins.registry import resolve

    return resolve(kind, value)


def validate(cfg: MoepipeConfig | DictConfig) -> MoepipeConfig:
    """Check semantics the types cannot express; return the config as a typed object.

    Raises ConfigError with one line: `<field>=<value> <problem>: <fix>`. The steps run in
    this order, so a config with several problems always reports the same one first.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    _check_model(cfg.model)
    _check_moe(cfg.model, cfg.moe)
    _check_parallel(cfg)
    _check_schedule(cfg)
    _check_mesh(cfg)
    _check_placer(cfg.placer)
    _check_shadows(cfg)
    _check_data(cfg.data)
    _check_train(cfg)
    _check_optim(cfg.optim)
    _check_sim(cfg.sim)
    _check_workload(cfg)
    _check_advise_mesh(cfg)
    if cfg.moe.num_experts:  # what the backend cannot honour (fairscale/tutel), in its own module
        _plugin("moe_backend", cfg.moe.backend).check_config(cfg)
    _check_measurement(cfg)
    _check_logger(cfg.logger)
    return cfg


def _check_model(m: ModelConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
        _positive(f"model.{name}", getattr(m, name))
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: pick n_heads dividing d_model")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model.d_model/model.n_heads={m.d_model // m.n_heads} is odd: rotary embeddings need an even head dim")
    kv = m.n_kv_heads or m.n_heads
    if kv <= 0 or m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}: use a divisor of n_heads or null")


def _check_moe(m: ModelConfig, e: MoEConfig) -> None:
    _positive("moe.num_experts", e.num_experts, allow_zero=True)
    _plugin("moe_backend", e.backend)
    _one_of("moe.score_func", e.score_func, SCORE_FUNCS)
    _one_of("moe.drop_policy", e.drop_policy, DROP_POLICIES)
    _one_of("moe.aux_loss_type", e.aux_loss_type, AUX_LOSS_TYPES)
    if e.num_experts == 0:
        return
    if e.top_k < 1:
        raise ConfigError(f"moe.top_k={e.top_k} must be >= 1: route each token to at least one expert")
    if e.top_k > e.num_experts:
        raise ConfigError(f"moe.top_k={e.top_k} > moe.num_experts={e.num_experts}: set moe.top_k <= moe.num_experts")
    _positive("moe.expert_hidden", e.expert_hidden)
    _positive("moe.every", e.every)
    _positive("moe.first_dense", e.first_dense, allow_zero=True)
    if not moe_layer_ids(m, e):
        raise ConfigError(
            f"moe.every={e.every} with moe.first_dense={e.first_dense} leaves no MoE block in model.n_layers={m.n_layers}: "
            "lower moe.every/first_dense or set moe.num_experts=0 for a dense model"
        )
    if not math.isfinite(e.capacity_factor):
        raise ConfigError(f"moe.capacity_factor={e.capacity_factor} must be finite: use 0 for dropless")
    for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "router_jitter"):
        _positive(f"moe.{name}", getattr(e, name), allow_zero=True)
    if e.router_jitter >= 1:
        raise ConfigError(f"moe.router_jitter={e.router_jitter} must be < 1: it scales inputs by U(1-j, 1+j)")
    _positive("moe.num_shared_experts", e.num_shared_experts, allow_zero=True)


def _check_parallel(cfg: MoepipeConfig) -> None:
    par = cfg.parallel
    for name in ("pp", "ep", "dp", "tp"):
        _positive(f"parallel.{name}", getattr(par, name))
    _one_of("parallel.backend", par.backend, ("auto", "gloo", "nccl"))
    _one_of("parallel.a2a", par.a2a, A2A_MODES)
    if par.tp > 1 or par.sp:  # first: TP refuses the hierarchical exchange in one line of its own
        _check_tensor_parallel(cfg)
    if par.a2a == "hierarchical":
        _check_hierarchical(cfg)


def _check_tensor_parallel(cfg: MoepipeConfig) -> None:
    """parallel.tp splits heads and FFN widths: each must divide evenly; and what TP does not
    (yet) run with stops here, before any worker starts."""
    par, m, e = cfg.parallel, cfg.model, cfg.moe
    tp = par.tp
    if par.sp and tp < 2:
        raise ConfigError(f"parallel.sp=true needs tensor parallelism (parallel.tp={tp}): set parallel.tp >= 2 or parallel.sp=false")
    if par.sp:
        _check_sequence_parallel(cfg)
    if m.n_heads % tp:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by parallel.tp={tp}: TP splits attention by heads; pick tp dividing n_heads")
    kv = m.n_kv_heads or m.n_heads
    if kv % tp:
        raise ConfigError(f"model.n_kv_heads={kv} is not divisible by parallel.tp={tp}: TP splits key/value heads too; pick tp dividing n_kv_heads")
    if m.vocab_size % tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={tp}: TP splits the embedding and head by "
                          "vocabulary; pick a vocab_size that is a multiple of tp")
    if m.tie_embeddings:
        raise ConfigError(f"model.tie_embeddings=true with parallel.tp={tp}: the vocabulary-split embedding (rowwise) and head (colwise) "
                          "cannot share one weight; set model.tie_embeddings=false or parallel.tp=1")
    if len(moe_layer_ids(m, e)) < m.n_layers and m.ffn_hidden % tp:
        raise ConfigError(f"model.ffn_hidden={m.ffn_hidden} is not divisible by parallel.tp={tp}: TP splits the dense FFN's width; pick tp dividing it")
    shared = (e.shared_expert_hidden or e.expert_hidden) * e.num_shared_experts
    if e.num_experts and shared % tp:
        raise ConfigError(f"moe.num_shared_experts*shared_expert_hidden={shared} is not divisible by parallel.tp={tp}: TP splits the shared "
                          "experts' width; pick tp dividing it")
    if e.num_experts and e.backend != "native":
        raise ConfigError(f"parallel.tp={tp} with moe.backend={e.backend}: only the native MoE layer splits its tokens over the TP group "
                          "(the baselines would dispatch every token tp times); use moe.backend=native or parallel.tp=1")
    t, sch = cfg.train, cfg.schedule
    tokens = t.batch_size // max(1, par.ep * par.dp * sch.microbatches) * t.seq_len
    if e.num_experts and tokens % tp:
        raise ConfigError(f"{tokens} tokens per microbatch do not split over parallel.tp={tp} (each TP rank dispatches an equal share): "
                          "pick train.batch_size/seq_len so batch_size/(ep*dp*microbatches)*seq_len is a multiple of tp")
    if par.a2a == "hierarchical":
        raise ConfigError(f"parallel.tp={tp} with parallel.a2a=hierarchical: EP groups are not adjacent ranks under TP; use parallel.a2a=flat")
    local = cfg.topology.devices_per_node
    if local >= 1 and local % tp:
        raise ConfigError(f"parallel.tp={tp} does not fit in a node of topology.devices_per_node={local}: a TP group must sit inside "
                          "one node; pick tp dividing devices_per_node")


def _check_sequence_parallel(cfg: MoepipeConfig) -> None:
    """parallel.sp shards every activation's positions over the TP group: they must split
    evenly, and routing must not depend on tokens other shards hold."""
    tp, e = cfg.parallel.tp, cfg.moe
    if cfg.train.seq_len % tp:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} is not divisible by parallel.tp={tp}: parallel.sp=true gives each TP rank "
                          "seq_len/tp positions; pick a seq_len that is a multiple of tp or parallel.sp=false")
    if e.num_experts and e.capacity_factor != 0:
        raise ConfigError(f"moe.capacity_factor={e.capacity_factor} with parallel.sp=true: an expert's capacity is counted over the whole "
                          "microbatch in token order, which no sequence shard sees; use moe.capacity_factor=0 (dropless) or parallel.sp=false")
    if e.num_experts and e.router_jitter > 0:
        raise ConfigError(f"moe.router_jitter={e.router_jitter} with parallel.sp=true: TP ranks share one RNG stream, so every sequence "
                          "shard would draw the same noise; use moe.router_jitter=0 or parallel.sp=false")


def _check_hierarchical(cfg: MoepipeConfig) -> None:
    """The hierarchical all-to-all takes its nodes from the topology: global rank r is on node
    r // topology.devices_per_node, and an EP group is ep adjacent ranks (moepipe.parallel.mesh:
    rank = ep_rank + ep * (pp_rank + pp * dp_rank)), so every EP group must be whole nodes of
    equal size or lie inside one node (then it is the flat exchange)."""
    par, topo = cfg.parallel, cfg.topology
    local, world = topo.devices_per_node, par.pp * par.ep * par.dp
    if par.ep < 2:
        raise ConfigError(f"parallel.a2a=hierarchical needs expert parallelism (parallel.ep={par.ep}): set parallel.ep >= 2 or parallel.a2a=flat")
    if local < 1 or topo.nodes < 1:
        return  # the topology's own check names it
    if world > topo.nodes * local:
        raise ConfigError(
            f"topology.nodes*devices_per_node={topo.nodes * local} < parallel.pp*ep*dp={world}, but parallel.a2a=hierarchical takes its "
            f"nodes from the topology (topology={topo.name}): pick a topology with a device per worker (e.g. topology=local_cpu_2nodes for 4 CPU ranks)"
        )
    if par.ep % local and local % par.ep and world > local:
        raise ConfigError(
            f"topology.devices_per_node={local} splits the EP groups of parallel.ep={par.ep} into unequal parts of nodes (rank r is on node "
            f"r // devices_per_node; an EP group is ep adjacent ranks): for parallel.a2a=hierarchical make devices_per_node a divisor "
            f"or a multiple of parallel.ep, or set parallel.a2a=flat"
        )


def _check_schedule(cfg: MoepipeConfig) -> None:
    sch, par = cfg.schedule, cfg.parallel
    _one_of("schedule.executor", sch.executor, ("torch", "moepipe"))
    if not isinstance(sch.lean_weight_grad, bool):
        raise ConfigError(f"schedule.lean_weight_grad={sch.lean_weight_grad!r} must be true or false")
    _positive("schedule.microbatches", sch.microbatches)
    _positive("schedule.virtual_stages", sch.virtual_stages)
    if sch.name.startswith("file:"):  # a CSV action table: read and checked against the mesh by moepipe.sim.schedules
        if sch.executor != "moepipe":
            raise ConfigError(f"schedule.name={sch.name} is an action table, which torch's classes cannot run: set schedule.executor=moepipe")
        if not os.path.isfile(os.path.expanduser(sch.name[5:])):
            raise ConfigError(f"schedule.name={sch.name}: no such file: give the path of a CSV action table (one row per pipeline rank)")
        return
    spec = _plugin("schedule", sch.name)
    if spec.torch_class is None and sch.executor != "moepipe":
        raise ConfigError(f"schedule.name={sch.name} has no torch class (its order is the schedule): set schedule.executor=moepipe")
    if sch.virtual_stages > 1 and not spec.multi_stage:
        raise ConfigError(
            f"schedule.virtual_stages={sch.virtual_stages} needs a multi-stage schedule, not schedule.name={sch.name}: "
            f"use one of {', '.join(MULTI_STAGE_SCHEDULES)} or virtual_stages=1"
        )
    n_stages = par.pp * sch.virtual_stages
    if n_stages > cfg.model.n_layers:
        raise ConfigError(
            f"parallel.pp*schedule.virtual_stages={n_stages} > model.n_layers={cfg.model.n_layers}: every stage needs a layer; "
            "lower parallel.pp or schedule.virtual_stages"
        )
    if spec.style == "v" and sch.virtual_stages != 2:
        raise ConfigError(f"schedule.virtual_stages={sch.virtual_stages} but schedule.name={sch.name} runs exactly 2 stages per rank: set schedule.virtual_stages=2")
    # torch's own constraints, by class, so a plug-in spec reusing a class gets them too
    cls = str(spec.torch_class).rpartition(":")[2]
    if cls == "ScheduleDualPipeV" and sch.microbatches < n_stages:
        raise ConfigError(f"schedule.microbatches={sch.microbatches} < {n_stages} stages: {sch.name} needs schedule.microbatches >= 2*parallel.pp")
    if cls in ("ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble"):
        rounds = max(1, sch.microbatches // par.pp)
        if sch.microbatches % rounds:
            raise ConfigError(
                f"schedule.microbatches={sch.microbatches} does not split into rounds of parallel.pp={par.pp}: "
                f"use a multiple of {par.pp} (or fewer than {par.pp})"
            )


def _check_mesh(cfg: MoepipeConfig) -> None:
    """The mesh against the devices, the schedule and the model."""
    par, t, sch, m, e = cfg.parallel, cfg.train, cfg.schedule, cfg.model, cfg.moe
    if par.backend == "nccl" and t.device == "cpu":
        raise ConfigError("parallel.backend=nccl needs GPUs but train.device=cpu: use parallel.backend=gloo (or auto)")
    if par.backend == "gloo" and t.device == "cuda" and world_size(cfg) > 1:
        raise ConfigError(
            "parallel.backend=gloo with train.device=cuda: gloo cannot run the pipeline's point-to-point sends and the expert "
            "all-to-all on CUDA tensors; use parallel.backend=nccl (or auto), or train.device=cpu"
        )
    if par.pp > 1 and sch.microbatches < par.pp:
        raise ConfigError(
            f"schedule.microbatches={sch.microbatches} < parallel.pp={par.pp}: the pipeline cannot fill; "
            f"set schedule.microbatches >= {par.pp}"
        )
    if m.tie_embeddings and par.pp > 1:
        raise ConfigError("model.tie_embeddings=true cannot be split over pipeline stages: set it false or parallel.pp=1")
    if e.num_experts and par.ep > 1 and par.ep > e.num_experts:
        raise ConfigError(f"parallel.ep={par.ep} > moe.num_experts={e.num_experts}: every EP rank needs an expert; lower parallel.ep")


def _check_placer(pc: PlacerConfig) -> None:
    _plugin("placer", pc.name)
    _positive("placer.interval", pc.interval, allow_zero=True)
    _positive("placer.replica_slots", pc.replica_slots, allow_zero=True)
    if not 0 <= pc.min_gain_frac < 1:
        raise ConfigError(f"placer.min_gain_frac={pc.min_gain_frac} must be in [0, 1): e.g. 0.02 (2% per step)")
    if not 0 <= pc.ema_decay < 1:
        raise ConfigError(f"placer.ema_decay={pc.ema_decay} must be in [0, 1): e.g. 0.8")
    _plugin("forecaster", pc.forecast)
    if pc.forecast_window < 1:
        raise ConfigError(f"placer.forecast_window={pc.forecast_window} must be an integer >= 1: steps of load history the forecaster reads, e.g. 64")
    if pc.objective not in OBJECTIVES:
        raise ConfigError(f"placer.objective={pc.objective!r} is not one of {list(OBJECTIVES)}: pick one")
    if not 0 < pc.quantile <= 1:
        raise ConfigError(f"placer.quantile={pc.quantile} must be in (0, 1]: e.g. 0.9 (the time 90% of the load scenarios stay under)")
    if pc.objective != "mean" and pc.forecast in ("ema", "last"):
        raise ConfigError(f"placer.objective={pc.objective} needs load scenarios, which placer.forecast={pc.forecast} does not give: "
                          "use placer.forecast=window, trend or periodic, or placer.objective=mean")


def _check_shadows(cfg: MoepipeConfig) -> None:
    """placer.shadow_slots: shadows live in the native expert-parallel dispatcher."""
    n = cfg.placer.shadow_slots
    _positive("placer.shadow_slots", n, allow_zero=True)
    _positive("placer.shadow_backoff", cfg.placer.shadow_backoff)
    if n == 0:
        return
    if cfg.parallel.ep < 2 or not cfg.moe.num_experts:
        raise ConfigError(f"placer.shadow_slots={n} needs expert parallelism (parallel.ep={cfg.parallel.ep}, moe.num_experts={cfg.moe.num_experts}): "
                          "set parallel.ep >= 2 or placer.shadow_slots=0")
    if cfg.moe.backend != "native":
        raise ConfigError(f"placer.shadow_slots={n} needs moe.backend=native (got {cfg.moe.backend}): its dispatcher runs the shadows; set placer.shadow_slots=0")
    if cfg.parallel.tp > 1:
        raise ConfigError(f"placer.shadow_slots={n} is not supported with parallel.tp={cfg.parallel.tp} (the shadow decision assumes an EP group "
                          "of consecutive ranks; not built for TP's token split): set placer.shadow_slots=0 or parallel.tp=1")
    name = cfg.schedule.name
    if name == "chimera":
        raise ConfigError(f"placer.shadow_slots={n} is not supported with schedule.name=chimera (two chains of stages; not tested with shadows): "
                          "set placer.shadow_slots=0 or another schedule")
    if name == "pipedream_2bw":
        raise ConfigError(f"placer.shadow_slots={n} is not supported with schedule.name=pipedream_2bw (weight versions are not sent to shadows): "
                          "set placer.shadow_slots=0 or another schedule")
    # a split backward (input gradients, then weight gradients later): refused when the exchange
    # ran per microbatch inside autograd ("backward through the graph a second time" under
    # interleaved_zb). The per-step exchange returns gradients after the last pass, W included,
    # but the W pass must also accumulate into the shadow leaf (not tested yet); file schedules
    # may split the backward too
    if name in ("interleaved_zb", "zbv", "dualpipev") or name.startswith("file:"):
        raise ConfigError(f"placer.shadow_slots={n} is not supported with schedule.name={name} (its backward is split into input and weight "
                          "passes): use gpipe, 1f1b or interleaved_1f1b, or placer.shadow_slots=0")


def advisory_config(cfg: MoepipeConfig) -> MoepipeConfig:
    """The config a one-process run's advisory re-plans plan for: its own, or placer.advise_mesh's mesh."""
    mesh = cfg.placer.advise_mesh
    if not mesh:
        return cfg
    pp, ep, dp = (int(x) for x in mesh)
    return replace(cfg, parallel=replace(cfg.parallel, pp=pp, ep=ep, dp=dp))


def _check_advise_mesh(cfg: MoepipeConfig) -> None:
    """placer.advise_mesh: [pp, ep, dp] of a mesh this model and schedule could run on."""
    mesh = cfg.placer.advise_mesh
    if not mesh:
        return
    value = list(mesh)
    if len(value) != 3 or any(int(x) < 1 for x in value):
        raise ConfigError(f"placer.advise_mesh={value} must be three positive integers [pp, ep, dp]: e.g. placer.advise_mesh=[2,2,1]")
    if world_size(cfg) > 1:
        raise ConfigError(f"placer.advise_mesh={value} is for one-process runs (parallel.pp*ep*dp={world_size(cfg)} re-plans its own mesh): "
                          "remove placer.advise_mesh")
    target = advisory_config(cfg)
    try:
        _check_parallel(target)
        _check_schedule(target)
        _check_mesh(target)
    except ConfigError as err:
        raise ConfigError(f"placer.advise_mesh={value} does not fit this job ({err})") from None
    from moepipe.placement.topology import from_config  # imports this module: import late

    devices = from_config(cfg.topology).n_devices
    if world_size(target) > devices:
        raise ConfigError(f"placer.advise_mesh={value} needs {world_size(target)} devices but topology={cfg.topology.name} has {devices}: "
                          "pick a larger topology")


def _check_data(d: DataConfig) -> None:
    _one_of("data.name", d.name, DATASETS)
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1): e.g. 0.05")
    if d.name == "memmap":
        if not d.path:
            raise ConfigError("data.path is not set: data=memmap needs data.path=/path/to/tokens.bin (make one with moepipe-make-memmap)")
        _one_of("data.token_dtype", d.token_dtype, ("uint16", "uint32"))


def _check_train(cfg: MoepipeConfig) -> None:
    t, m, par, sch = cfg.train, cfg.model, cfg.parallel, cfg.schedule
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_batches"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.eval_every", t.eval_every, allow_zero=True)
    _positive("train.num_threads", t.num_threads, allow_zero=True)
    _one_of("train.device", t.device, DEVICES)
    _one_of("train.dtype", t.dtype, DTYPES)
    for name in ("ckpt_every", "ckpt_keep", "max_restarts"):
        _positive(f"train.{name}", getattr(t, name), allow_zero=True)
    _one_of("train.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    if t.resume not in ("auto", "never") and not os.path.exists(t.resume):
        raise ConfigError(
            f"train.resume={t.resume} does not exist: give a checkpoint (.../ckpt/step_N), a ckpt dir or a run dir, or use auto|never"
        )
    _check_topology(cfg.topology)
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} > model.max_seq_len={m.max_seq_len}: lower train.seq_len or raise model.max_seq_len")
    # Every pipeline (one per (ep, dp) coordinate) trains on its own slice of the batch.
    slices = par.dp * par.ep * sch.microbatches
    if t.batch_size % slices:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by parallel.ep*parallel.dp*schedule.microbatches={slices}: "
            "pick a batch size that splits evenly"
        )


def _check_optim(o: OptimConfig) -> None:
    _positive("optim.lr", o.lr)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]: it is the final fraction of optim.lr")


def _check_sim(s: SimConfig) -> None:
    _one_of("sim.routing", s.routing, ("uniform", "zipf"))
    if not 0 < s.efficiency <= 1:
        raise ConfigError(f"sim.efficiency={s.efficiency} must be in (0, 1]: e.g. 0.5")
    if s.zipf_s < 0:
        raise ConfigError(f"sim.zipf_s={s.zipf_s} must be >= 0: 0 is uniform, ~1 is strongly skewed")
    if s.search_top < 1:
        raise ConfigError(f"sim.search_top={s.search_top} must be >= 1: the number of best meshes sim.search_mesh reports")


def _check_workload(cfg: MoepipeConfig) -> None:
    w = cfg.workload
    _plugin("workload", w.kind)
    _positive("workload.strength", w.strength, allow_zero=True)
    _positive("workload.period", w.period)
    _positive("workload.burst_every", w.burst_every)
    devices = cfg.topology.nodes * cfg.topology.devices_per_node
    needs_topology = (cfg.placer.interval > 0 and cfg.placer.name != "static") or w.emulate_speed
    if needs_topology and world_size(cfg) > 1 and world_size(cfg) > devices:
        raise ConfigError(
            f"parallel.pp*ep*dp={world_size(cfg)} > topology devices={devices} (topology={cfg.topology.name}) but the placer "
            "or workload.emulate_speed reads the topology: pick a topology with a device per worker (e.g. topology.devices_per_node)"
        )


def _check_measurement(cfg: MoepipeConfig) -> None:
    """topology.detect/probe measure a multi-process job's workers."""
    if world_size(cfg) == 1 and (cfg.topology.detect or cfg.topology.probe):
        key = "topology.detect" if cfg.topology.detect else "topology.probe"
        raise ConfigError(
            f"{key}=true measures the workers of a multi-process job, but parallel.pp*ep*dp=1 runs one process: "
            f"set {key}=false, or use several workers (e.g. parallel=pp2_ep2)"
        )


def _check_logger(lg: LoggerConfig) -> None:
    _one_of("logger.name", lg.name, LOGGERS)
    _one_of("logger.wandb.mode", lg.wandb.mode, WANDB_MODES)
    _one_of("logger.progress", lg.progress, ("auto", "rich", "plain", "none"))


def _check_topology(topology: TopologyConfig) -> None:
    """A broken topology file fails here, at start-up, with the topology module's one-line error
    (device counts, link figures, matrices), whether or not the placer reads it later."""
    from moepipe.placement.topology import from_config  # imports this module: import late

    from_config(topology)


def conf_dir() -> str:
    """The repository's conf/ (editable installs), or $MOEPIPE_CONF."""
    path = os.environ.get("MOEPIPE_CONF") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "conf")
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        raise ConfigError(f"MOEPIPE_CONF={path} has no config.yaml: install moepipe editable from its checkout (pip install -e .) or point MOEPIPE_CONF at conf/")
    return path


def compose_config(overrides: list[str] | tuple = ()) -> MoepipeConfig:
    """conf/ + command-line style overrides -> validated config, as the CLIs compose it
    (for scripts, experiments and tests that do not go through @hydra.main)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return validate(compose(config_name="config", overrides=list(overrides)))


def world_size(cfg: MoepipeConfig) -> int:
    return cfg.parallel.pp * cfg.parallel.ep * cfg.parallel.dp * cfg.parallel.tp
