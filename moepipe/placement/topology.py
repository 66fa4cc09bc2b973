"""Devices and links: who sits on which node, how fast each device computes, and what a
message between two devices costs (alpha-beta: time = latency + bytes / bandwidth).

Pure numpy; no process group is needed except by `probe_links`, which measures a real one.
Units: bytes, seconds, bytes/s inside; GB/s (1e9 bytes/s) and microseconds in configs.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from moepipe.config import ConfigError, DeviceGroupConfig, TopologyConfig

GB = 1e9
US = 1e-6


@dataclass(frozen=True)
class Device:
    index: int
    node: int
    name: str
    tflops: float  # sustained dense matmul TFLOP/s in the training dtype
    memory_bytes: float
    speed: float = 1.0

    @property
    def flops_per_s(self) -> float:
        return self.tflops * 1e12 * self.speed

    @property
    def kind(self) -> str:
        return "cpu" if self.name.lower().startswith("cpu") else "cuda"


@dataclass
class Topology:
    """`bandwidth[i, j]` (bytes/s) and `latency[i, j]` (s) for a message from device i to j."""

    name: str
    devices: list[Device]
    bandwidth: np.ndarray
    latency: np.ndarray
    node_of: np.ndarray = field(init=False)
    # Tensor parallelism (`tp_groups`): each device stands for a TP group of `tp` GPUs inside one
    # node; tp_ring_bandwidth/latency [n] are the slowest hop of the group's own ring (None: tp=1)
    tp: int = 1
    tp_ring_bandwidth: Optional[np.ndarray] = None
    tp_ring_latency: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.node_of = np.array([d.node for d in self.devices], dtype=np.int64)
        self.bandwidth = np.asarray(self.bandwidth, dtype=np.float64)
        self.latency = np.asarray(self.latency, dtype=np.float64)
        # 1/bandwidth with a free diagonal: a device "sending to itself" costs nothing.
        self._inv_bw = 1.0 / self.bandwidth
        np.fill_diagonal(self._inv_bw, 0.0)
        self._same_node = self.node_of[:, None] == self.node_of[None, :]
        self._groups: dict = {}  # group -> its links (`_links`)

    def _links(self, g: np.ndarray) -> tuple:
        """(1/bandwidth, latency, same node, off-diagonal) among the members of group g, cached
        per group: placers time thousands of exchanges on a few groups (treat the matrices as
        fixed after construction, as 1/bandwidth always was)."""
        key = g.tobytes()
        hit = self._groups.get(key)
        if hit is None:
            ix = np.ix_(g, g)
            hit = (self._inv_bw[ix], self.latency[ix], self._same_node[ix], ~np.eye(len(g), dtype=bool))
            if len(self._groups) > 64:
                self._groups.clear()
            self._groups[key] = hit
        return hit

    # -------------------------------------------------------------- basics
    @property
    def n_devices(self) -> int:
        return len(self.devices)

    @property
    def n_nodes(self) -> int:
        return int(self.node_of.max()) + 1 if self.devices else 0

    def flops_per_s(self, ranks: Any = None) -> np.ndarray:
        """Per-device throughput (FLOP/s, tflops * speed), optionally for an index array."""
        f = np.array([d.flops_per_s for d in self.devices])
        return f if ranks is None else f[np.asarray(ranks)]

    def same_node(self, a: Any, b: Any) -> np.ndarray:
        return self.node_of[np.asarray(a)] == self.node_of[np.asarray(b)]

    def subset(self, ranks: Sequence[int], name: Optional[str] = None) -> "Topology":
        """The topology seen by a job that uses only `ranks` (renumbered 0..len-1, nodes kept)."""
        idx = np.asarray(ranks, dtype=np.int64)
        devs = [Device(i, d.node, d.name, d.tflops, d.memory_bytes, d.speed) for i, d in enumerate(self.devices[j] for j in idx)]
        ring = (None, None) if self.tp_ring_bandwidth is None else (self.tp_ring_bandwidth[idx], self.tp_ring_latency[idx])
        return Topology(name or self.name, devs, self.bandwidth[np.ix_(idx, idx)], self.latency[np.ix_(idx, idx)], self.tp, *ring)

    # -------------------------------------------------------------- collective costs
    def p2p_time(self, nbytes: Any, src: Any, dst: Any) -> Any:
        """alpha + bytes/beta; vectorised over array arguments; zero when src == dst."""
        src, dst = np.asarray(src), np.asarray(dst)
        t = self.latency[src, dst] + np.asarray(nbytes, dtype=np.float64) / self.bandwidth[src, dst]
        t = np.where(src == dst, 0.0, t)
        return float(t) if t.ndim == 0 else t

    def all_to_all_time(self, byte_matrix: Any, group: Sequence[int]) -> Any:
        """Time of an all-to-all where member i sends byte_matrix[..., i, j] to member j.

        Every member sends and receives concurrently; intra-node (NVLink/shm) and inter-node
        (NIC) traffic use separate ports and so proceed in parallel. A member's time is the
        slowest of its four streams (send/recv x intra/inter), each the sum over peers of
        bytes/bandwidth plus the largest latency among its peers in that class. The collective
        ends when its slowest member does. Leading dimensions of byte_matrix are batched.
        """
        g = np.asarray(group, dtype=np.int64)
        b = np.asarray(byte_matrix, dtype=np.float64)
        inv, lat, same, off = self._links(g)
        worst = np.zeros(b.shape[:-2])
        for mask in (same & off, ~same):
            t = b * inv * mask
            active = (b > 0) & mask
            lat_send = np.max(np.where(active, lat, 0.0), axis=-1)
            lat_recv = np.max(np.where(active, lat, 0.0), axis=-2)
            send = t.sum(axis=-1) + lat_send
            recv = t.sum(axis=-2) + lat_recv
            worst = np.maximum(worst, np.maximum(send, recv).max(axis=-1))
        return float(worst) if worst.ndim == 0 else worst

    def dispatch_time(self, recv_bytes: Any, group: Sequence[int]) -> Any:
        """All-to-all where member j receives recv_bytes[..., j] in total, sent in equal parts by
        every member (tokens start evenly spread over the group, as in MoE dispatch).

        Same model as `all_to_all_time` with byte_matrix[i, j] = recv_bytes[j] / n, computed
        with matrix products so that large batches stay cheap.
        """
        g = np.asarray(group, dtype=np.int64)
        n = len(g)
        r = np.asarray(recv_bytes, dtype=np.float64) / n
        inv, lat, same, off = self._links(g)
        worst = np.zeros(r.shape[:-1])
        for mask in (same & off, ~same):
            if not mask.any():
                continue
            m = mask.astype(np.float64)
            # sum_j r_j / bw_ij over peers j in class; einsum, not a BLAS product: OpenBLAS runs these
            # small products on all its threads, which costs more than it saves (and on a shared machine, stalls)
            send = np.einsum("...j,ij->...i", r, inv * m)
            recv = r * (inv * m).sum(axis=0)  # r_j * sum_i 1/bw_ij
            active_r = r > 0  # [..., n]
            # Latency: the largest in class among peers that actually exchange bytes.
            lat_m = np.where(mask, lat, 0.0)
            any_recv = active_r.any(axis=-1, keepdims=True)
            lat_send = _sender_latency(active_r, lat_m)
            lat_recv = np.where(active_r, lat_m.max(axis=0), 0.0)
            t = np.maximum(send + np.where(any_recv, lat_send, 0.0), recv + lat_recv)
            worst = np.maximum(worst, t.max(axis=-1))
        return float(worst) if worst.ndim == 0 else worst

    def dispatch_bytes_split(self, recv_bytes: Any, group: Sequence[int]) -> tuple[float, float]:
        """(intra-node, inter-node) bytes moved by `dispatch_time`'s traffic pattern, summed."""
        g = np.asarray(group, dtype=np.int64)
        n = len(g)
        r = np.asarray(recv_bytes, dtype=np.float64) / n
        same = self._same_node[np.ix_(g, g)]
        peers_intra = same.sum(axis=0) - 1  # senders on j's node other than j
        peers_inter = n - 1 - peers_intra
        return float((r * peers_intra).sum()), float((r * peers_inter).sum())

    def all_reduce_time(self, nbytes: float, group: Sequence[int]) -> float:
        """Ring all-reduce in the group's order: 2(n-1) steps of nbytes/n over the slowest hop."""
        g = list(group)
        n = len(g)
        if n <= 1 or nbytes <= 0:
            return 0.0
        src, dst = np.array(g), np.array(g[1:] + g[:1])
        bw = self.bandwidth[src, dst].min()
        lat = self.latency[src, dst].max()
        return float(2 * (n - 1) * (lat + nbytes / n / bw))


def _sender_latency(active: np.ndarray, lat_m: np.ndarray) -> np.ndarray:
    """[..., n]: the largest latency lat_m[i, j] over the receivers j that get bytes (`active`
    [..., n]), per sender i; rows where every member receives read lat_m's row maxima (the same
    values, without a [..., n, n] temporary)."""
    n = active.shape[-1]
    a = active.reshape(-1, n)
    out = np.empty(a.shape)
    full = a.all(-1)
    out[full] = lat_m.max(-1)
    if not full.all():
        out[~full] = np.max(np.where(a[~full][:, None, :], lat_m, 0.0), axis=-1)
    return out.reshape(active.shape)


# ------------------------------------------------------------------ construction from config


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)


def _check_matrix(path: str, mat: Any, n: int, positive: bool) -> np.ndarray:
    try:
        a = np.asarray(mat, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{path} is not a numeric matrix: give a list of {n} lists of {n} numbers") from None
    if a.shape != (n, n):
        raise ConfigError(f"{path} has shape {a.shape} but the topology has {n} devices: give a {n}x{n} matrix")
    off = ~np.eye(n, dtype=bool)
    bad = ~np.isfinite(a[off]) | ((a[off] <= 0) if positive else (a[off] < 0))
    if bad.any():
        need = "> 0" if positive else ">= 0"
        raise ConfigError(f"{path} has an entry {a[off][bad][0]} off the diagonal: every link needs a finite value {need}")
    return a


def _positive(path: str, value: Any, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}={value!r} is not a number: set a positive number") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{path}={value} must be {'>= 0' if allow_zero else '> 0'}: set a {'non-negative' if allow_zero else 'positive'} value")
    return v


def from_config(cfg: TopologyConfig | Mapping, world_size: Optional[int] = None) -> Topology:
    """Build a Topology from a TopologyConfig (or a plain mapping with the same keys).

    With `world_size` given, a job smaller than the described cluster uses its first
    `world_size` devices; a larger one is an error.
    """
    nodes = int(_positive("topology.nodes", _get(cfg, "nodes", 1)))
    per_node = int(_positive("topology.devices_per_node", _get(cfg, "devices_per_node", 1)))
    n = nodes * per_node
    groups = list(_get(cfg, "device_groups", None) or [])
    if not groups:
        raise ConfigError("topology.device_groups is empty: list at least one {count, name, tflops, memory_gb}")
    counts = [int(_get(g, "count", 1)) for g in groups]
    if any(c <= 0 for c in counts) or sum(counts) != n:
        raise ConfigError(
            f"topology.device_groups counts={counts} sum to {sum(counts)} but topology.nodes*devices_per_node={n}: "
            "make the counts add up to nodes*devices_per_node"
        )
    devices: list[Device] = []
    intra_bw_dev, inter_bw_dev = [], []
    intra_bw = _positive("topology.intra_node_bw_gbps", _get(cfg, "intra_node_bw_gbps", 10.0)) * GB
    inter_bw = _positive("topology.inter_node_bw_gbps", _get(cfg, "inter_node_bw_gbps", 1.0)) * GB
    for gi, (g, c) in enumerate(zip(groups, counts)):
        p = f"topology.device_groups[{gi}]"
        tflops = _positive(f"{p}.tflops", _get(g, "tflops", DeviceGroupConfig.tflops))
        mem = _positive(f"{p}.memory_gb", _get(g, "memory_gb", DeviceGroupConfig.memory_gb))
        speed = _positive(f"{p}.speed", _get(g, "speed", 1.0))
        gi_bw = _get(g, "intra_node_bw_gbps", None)
        ge_bw = _get(g, "inter_node_bw_gbps", None)
        gi_bw = intra_bw if gi_bw is None else _positive(f"{p}.intra_node_bw_gbps", gi_bw) * GB
        ge_bw = inter_bw if ge_bw is None else _positive(f"{p}.inter_node_bw_gbps", ge_bw) * GB
        for _ in range(c):
            i = len(devices)
            devices.append(Device(i, i // per_node, str(_get(g, "name", "cpu")), tflops, mem * GB, speed))
            intra_bw_dev.append(gi_bw)
            inter_bw_dev.append(ge_bw)

    node = np.arange(n) // per_node
    same = node[:, None] == node[None, :]
    bw_matrix = _get(cfg, "bandwidth_matrix_gbps", None)
    lat_matrix = _get(cfg, "latency_matrix_us", None)
    if bw_matrix is not None:
        bw = _check_matrix("topology.bandwidth_matrix_gbps", bw_matrix, n, positive=True) * GB
        np.fill_diagonal(bw, np.inf)
    else:
        ib, eb = np.array(intra_bw_dev), np.array(inter_bw_dev)
        bw = np.where(same, np.minimum.outer(ib, ib), np.minimum.outer(eb, eb))
    if lat_matrix is not None:
        lat = _check_matrix("topology.latency_matrix_us", lat_matrix, n, positive=False) * US
    else:
        li = _positive("topology.intra_node_latency_us", _get(cfg, "intra_node_latency_us", 0.0), allow_zero=True) * US
        le = _positive("topology.inter_node_latency_us", _get(cfg, "inter_node_latency_us", 0.0), allow_zero=True) * US
        lat = np.where(same, li, le)
    np.fill_diagonal(lat, 0.0)
    topo = Topology(str(_get(cfg, "name", "custom")), devices, bw, lat)
    if world_size is not None:
        if world_size <= 0:
            raise ConfigError(f"world_size={world_size} must be > 0: use parallel.pp*ep*dp >= 1")
        if world_size > n:
            raise ConfigError(
                f"parallel.pp*ep*dp={world_size} > topology devices={n} (topology={topo.name}): "
                "pick a larger topology or lower parallel.pp/ep/dp"
            )
        if world_size < n:
            topo = topo.subset(range(world_size))
    return topo


def tp_groups(topo: Topology, tp: int, n_groups: Optional[int] = None) -> Topology:
    """The topology the placers and the simulator see under tensor parallelism: one device per
    TP group (GPUs g*tp .. g*tp+tp-1, the runtime's innermost mesh dimension), for the first
    `n_groups` groups (default: all). A group device computes at tp x its slowest member's
    FLOP/s (attention, dense FFN and shared experts split over its GPUs; routed tokens split
    too, each GPU holding the group's experts); `memory_bytes` stays one GPU's (the cost model
    reports memory per GPU). Between groups, TP rank k talks to TP rank k, each over its own
    port, so a link is tp x the slowest of those tp links (latency the largest). The group's
    own ring (its TP collectives) is kept in tp_ring_bandwidth/latency. tp=1: `topo` itself.
    A group that spans nodes is a ConfigError: TP collectives run every block and belong on
    the intra-node links."""
    tp = int(tp)
    if tp < 1:
        raise ConfigError(f"parallel.tp={tp} must be >= 1: the GPUs of one tensor-parallel group")
    if tp == 1 or topo.tp == tp:
        return topo if n_groups is None or n_groups == topo.n_devices else topo.subset(range(n_groups))
    if topo.tp != 1:
        raise ConfigError(f"topology={topo.name} already groups devices by tp={topo.tp}: group the per-GPU topology by parallel.tp={tp}")
    n = topo.n_devices // tp if n_groups is None else int(n_groups)
    if n * tp > topo.n_devices:
        raise ConfigError(f"parallel.pp*ep*dp*tp={n * tp} > topology devices={topo.n_devices} (topology={topo.name}): "
                          "pick a larger topology or lower parallel.pp/ep/dp/tp")
    members = np.arange(n * tp).reshape(n, tp)  # [group, tp_rank] -> GPU
    nodes = topo.node_of[members]
    if (nodes != nodes[:, :1]).any():
        per_node = int((topo.node_of == topo.node_of[0]).sum())
        raise ConfigError(f"parallel.tp={tp} does not fit in a node of topology={topo.name} ({per_node} devices per node): "
                          "pick parallel.tp dividing topology.devices_per_node")
    devs = []
    for g, row in enumerate(members):
        ds = [topo.devices[j] for j in row]
        slow = min(ds, key=lambda d: d.flops_per_s)
        devs.append(Device(g, ds[0].node, ds[0].name, slow.tflops * tp, min(d.memory_bytes for d in ds), slow.speed))
    # [g, h, k]: TP rank k of group g -> TP rank k of group h
    bw = topo.bandwidth[members[:, None, :], members[None, :, :]].min(-1) * tp
    lat = topo.latency[members[:, None, :], members[None, :, :]].max(-1)
    np.fill_diagonal(bw, np.inf)
    np.fill_diagonal(lat, 0.0)
    nxt = np.roll(members, -1, axis=1)
    ring_bw = topo.bandwidth[members, nxt].min(-1)
    ring_lat = topo.latency[members, nxt].max(-1)
    return Topology(f"{topo.name}/tp{tp}", devs, bw, lat, tp, ring_bw, ring_lat)


def free_topology(n: int, tflops: float = 1.0, per_node: Optional[int] = None) -> Topology:
    """n identical devices with infinitely fast links (communication costs nothing)."""
    per_node = per_node or n
    devs = [Device(i, i // per_node, "ideal", tflops, 1e12) for i in range(n)]
    return Topology("free", devs, np.full((n, n), np.inf), np.zeros((n, n)))


# ------------------------------------------------------------------ run-time detection

# Sustained dense BF16 matmul figures (TFLOP/s) used when a device is detected by name;
# roughly 0.7x the published dense peaks (H100 SXM 989, A100 312, V100 125 fp16, L4 121).
_KNOWN_GPUS = {"H100": 690.0, "H200": 690.0, "A100": 220.0, "V100": 85.0, "L4": 85.0, "A10": 90.0}


def _local_world_size(env: Mapping[str, str], world_size: int) -> int:
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_GPUS_ON_NODE"):
        v = env.get(key, "")
        v = v.split("(")[0].split(",")[0]  # SLURM forms like "8(x4)"
        if v.strip().isdigit() and int(v) > 0:
            return min(int(v), world_size)
    if env.get("SLURM_NNODES", "").isdigit() and int(env["SLURM_NNODES"]) > 0:
        return max(1, world_size // int(env["SLURM_NNODES"]))
    return world_size


def detect_topology(
    world_size: int, env: Optional[Mapping[str, str]] = None, base: Optional[TopologyConfig | Mapping] = None, use_cuda: Optional[bool] = None
) -> Topology:
    """Describe the machines this job runs on.

    Node grouping comes from launcher variables (torchrun LOCAL_WORLD_SIZE, SLURM, Open MPI);
    device properties from torch.cuda when present, else CPU defaults; link figures from
    `base` (a TopologyConfig) or conservative defaults. Refine links with `probe_links`.
    """
    env = os.environ if env is None else env
    per_node = _local_world_size(env, world_size)
    nodes = -(-world_size // per_node)
    name, tflops, mem = "cpu", DeviceGroupConfig.tflops, DeviceGroupConfig.memory_gb
    try:
        cuda = False
        if use_cuda is not False:  # importing torch is slow: skip it when told there is no GPU
            import torch

            cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        if cuda:
            props = torch.cuda.get_device_properties(0)
            name, mem = props.name, props.total_memory / GB
            tflops = next((v for k, v in _KNOWN_GPUS.items() if k in props.name), 100.0)
    except Exception:  # torch missing or no driver: fall back to CPU figures
        cuda = False
    cpu = name == "cpu"
    cfg = {
        "name": "detected",
        "nodes": nodes,
        "devices_per_node": per_node,
        "device_groups": [{"count": nodes * per_node, "name": name, "tflops": tflops, "memory_gb": mem}],
        "intra_node_bw_gbps": _get(base, "intra_node_bw_gbps", 5.0 if cpu else 100.0) if base is not None else (5.0 if cpu else 100.0),
        "intra_node_latency_us": _get(base, "intra_node_latency_us", 30.0) if base is not None else (30.0 if cpu else 10.0),
        "inter_node_bw_gbps": _get(base, "inter_node_bw_gbps", 1.0) if base is not None else (1.0 if cpu else 25.0),
        "inter_node_latency_us": _get(base, "inter_node_latency_us", 100.0) if base is not None else (100.0 if cpu else 20.0),
    }
    return from_config(cfg, world_size)


# ------------------------------------------------------------------ measurement on a real group


def probe_links(group: Any = None, small_bytes: int = 8, large_bytes: int = 1 << 20, iters: int = 5, device: Any = None) -> dict:
    """Measure alpha-beta figures on an initialised torch.distributed group (all ranks call it).

    Point-to-point: ping-pong between every ordered pair (i < j), timed on i, fitted to
    t = alpha + bytes/beta from a small and a large message. All-to-all: `all_to_all_single`
    of `large_bytes` per peer, reported as per-device bytes/s. Returns plain lists (JSON-able)
    identical on every rank: {"bandwidth_gbps": [[...]], "latency_us": [[...]], "all_to_all_gbps": x}.
    `device`: where the buffers live (the job's device: NCCL only moves CUDA tensors).
    """
    import torch
    import torch.distributed as dist

    device = torch.device("cpu") if device is None else torch.device(device)
    # NCCL calls return before the transfer ends: synchronise before every clock read.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    gr = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    small = torch.zeros(max(1, small_bytes // 4), dtype=torch.float32, device=device)
    large = torch.zeros(max(1, large_bytes // 4), dtype=torch.float32, device=device)
    bw = torch.zeros(n, n, dtype=torch.float64, device=device)
    lat = torch.zeros(n, n, dtype=torch.float64, device=device)

    def pingpong(buf: torch.Tensor, peer: int, first: bool) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            if first:
                dist.send(buf, gr(peer), group=group)
                dist.recv(buf, gr(peer), group=group)
            else:
                dist.recv(buf, gr(peer), group=group)
                dist.send(buf, gr(peer), group=group)
        sync()
        return (time.perf_counter() - t0) / (2 * iters)

    for i in range(n):
        for j in range(i + 1, n):
            if rank in (i, j):
                peer, first = (j, True) if rank == i else (i, False)
                pingpong(small, peer, first)  # warm-up (connection set-up)
                ts, tl = pingpong(small, peer, first), pingpong(large, peer, first)
                if rank == i:
                    beta = max(large.numel() * 4 - small.numel() * 4, 1) / max(tl - ts, 1e-9)
                    alpha = max(ts - small.numel() * 4 / beta, 0.0)
                    bw[i, j] = bw[j, i] = beta / GB
                    lat[i, j] = lat[j, i] = alpha / US
            dist.barrier(group=group)
    dist.all_reduce(bw, group=group)  # only the measuring rank wrote each entry
    dist.all_reduce(lat, group=group)
    a2a_in = torch.zeros(n * large.numel(), dtype=torch.float32, device=device)
    a2a_out = torch.empty_like(a2a_in)
    dist.all_to_all_single(a2a_out, a2a_in, group=group)  # warm-up
    dist.barrier(group=group)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_to_all_single(a2a_out, a2a_in, group=group)
    sync()
    dt = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
    a2a = (n - 1) * large.numel() * 4 / float(dt) / GB if n > 1 else float("inf")
    bw = bw.cpu()
    bw.fill_diagonal_(float("inf"))
    return {"bandwidth_gbps": bw.tolist(), "latency_us": lat.cpu().tolist(), "all_to_all_gbps": a2a}


def apply_probe(topo: Topology, probe: Mapping[str, Any]) -> Topology:
    """A copy of `topo` whose links are the measured ones."""
    n = topo.n_devices
    bw = _check_matrix("probe.bandwidth_gbps", probe["bandwidth_gbps"], n, positive=True) * GB
    np.fill_diagonal(bw, np.inf)
    lat = _check_matrix("probe.latency_us", probe["latency_us"], n, positive=False) * US
    return Topology(topo.name + "+probe", list(topo.devices), bw, lat)
