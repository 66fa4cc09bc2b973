"""Topology construction, validation errors and alpha-beta collective costs (hand-computed)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from moepipe.config import ConfigError, DeviceGroupConfig, TopologyConfig
from moepipe.placement.topology import GB, US, _sender_latency, apply_probe, detect_topology, from_config

ROOT = Path(__file__).resolve().parents[1]


def two_nodes(**kw) -> TopologyConfig:
    base = dict(name="t", nodes=2, devices_per_node=2, device_groups=[DeviceGroupConfig(count=4, tflops=1.0)],
                intra_node_bw_gbps=10.0, intra_node_latency_us=2.0, inter_node_bw_gbps=1.0, inter_node_latency_us=5.0)
    base.update(kw)
    return TopologyConfig(**base)


def test_from_config_nodes_and_links():
    t = from_config(two_nodes())
    assert t.n_devices == 4 and t.n_nodes == 2
    assert list(t.node_of) == [0, 0, 1, 1]
    assert t.bandwidth[0, 1] == 10 * GB and t.bandwidth[1, 2] == 1 * GB
    assert t.latency[0, 1] == pytest.approx(2 * US) and t.latency[0, 3] == pytest.approx(5 * US)


def test_p2p_alpha_beta():
    t = from_config(two_nodes())
    assert t.p2p_time(1e6, 0, 1) == pytest.approx(2e-6 + 1e6 / 10e9)
    assert t.p2p_time(1e6, 0, 2) == pytest.approx(5e-6 + 1e6 / 1e9)
    assert t.p2p_time(1e6, 3, 3) == 0.0
    np.testing.assert_allclose(t.p2p_time(1e6, np.array([0, 0]), np.array([1, 2])), [2e-6 + 1e-4, 5e-6 + 1e-3])


def test_all_to_all_hand_computed():
    t = from_config(two_nodes())
    # every member sends 1 MB to every other member
    b = np.full((4, 4), 1e6)
    # per member: intra stream 1 MB / 10 GB/s + 2 us; inter stream 2 x (1 MB / 1 GB/s) + 5 us (the slower one)
    assert t.all_to_all_time(b, [0, 1, 2, 3]) == pytest.approx(2e6 / 1e9 + 5e-6)
    # within one node only
    assert t.all_to_all_time(np.full((2, 2), 1e6), [0, 1]) == pytest.approx(1e6 / 10e9 + 2e-6)
    # batched leading dims
    out = t.all_to_all_time(np.stack([b, 2 * b]), [0, 1, 2, 3])
    np.testing.assert_allclose(out, [2e-3 + 5e-6, 4e-3 + 5e-6])


def test_dispatch_matches_general_all_to_all():
    t = from_config(two_nodes(inter_node_bw_gbps=3.0))
    recv = np.array([4e6, 1e6, 0.0, 8e6])
    mat = np.tile(recv / 4, (4, 1))
    assert t.dispatch_time(recv, [0, 1, 2, 3]) == pytest.approx(t.all_to_all_time(mat, [0, 1, 2, 3]))
    intra, inter = t.dispatch_bytes_split(recv, [0, 1, 2, 3])
    # each destination receives recv/4 from its one node peer (intra) and two remote members (inter)
    assert intra == pytest.approx(recv.sum() / 4) and inter == pytest.approx(2 * recv.sum() / 4)


def test_dispatch_time_batched_rows_equal_single_rows():
    # rows where every member receives take the latency's row maxima; others the masked form
    t = from_config(two_nodes(inter_node_bw_gbps=3.0))
    rng = np.random.default_rng(0)
    recv = rng.random((12, 4)) * 1e6
    recv[rng.random((12, 4)) < 0.3] = 0.0
    recv[0] = 0.0
    batch = t.dispatch_time(recv, [0, 1, 2, 3])
    for row, got in zip(recv, batch):
        assert got == t.dispatch_time(row, [0, 1, 2, 3])
        assert got == pytest.approx(t.all_to_all_time(np.tile(row / 4, (4, 1)), [0, 1, 2, 3]), rel=1e-12)
    lat = rng.random((4, 4))
    active = recv > 0
    assert np.array_equal(_sender_latency(active, lat), np.max(np.where(active[:, None, :], lat, 0.0), axis=-1))


def test_all_reduce_ring():
    t = from_config(two_nodes())
    # ring 0-1-2-3-0: slowest hop 1 GB/s, largest latency 5 us; 2(n-1) steps of n_bytes/n
    assert t.all_reduce_time(4e6, [0, 1, 2, 3]) == pytest.approx(6 * (5e-6 + 1e6 / 1e9))
    assert t.all_reduce_time(4e6, [2]) == 0.0


def test_matrices_override_and_shape_error():
    bw = [[0, 5, 5], [5, 0, 2], [5, 2, 0]]
    t = from_config(two_nodes(nodes=1, devices_per_node=3, device_groups=[DeviceGroupConfig(count=3)], bandwidth_matrix_gbps=bw))
    assert t.bandwidth[1, 2] == 2 * GB
    with pytest.raises(ConfigError, match=r"topology.bandwidth_matrix_gbps has shape \(2, 2\).*3x3"):
        from_config(two_nodes(nodes=1, devices_per_node=3, device_groups=[DeviceGroupConfig(count=3)], bandwidth_matrix_gbps=[[0, 1], [1, 0]]))
    with pytest.raises(ConfigError, match="topology.latency_matrix_us"):
        from_config(two_nodes(latency_matrix_us=[[0, 1, 1], [1, 0, 1], [1, 1, 0]]))


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(inter_node_bw_gbps=0.0), "topology.inter_node_bw_gbps"),
        (dict(intra_node_bw_gbps=-1.0), "topology.intra_node_bw_gbps"),
        (dict(device_groups=[DeviceGroupConfig(count=3)]), "topology.device_groups counts"),
        (dict(bandwidth_matrix_gbps=[[0, 1, 1, 1], [1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 1, 0]]), "topology.bandwidth_matrix_gbps"),
        (dict(device_groups=[DeviceGroupConfig(count=4, tflops=0.0)]), "topology.device_groups[0].tflops"),
    ],
)
def test_validation_errors_are_one_line(kw, field):
    with pytest.raises(ConfigError) as ei:
        from_config(two_nodes(**kw))
    msg = str(ei.value)
    assert msg.startswith(field) and "\n" not in msg and ":" in msg


def test_world_size_mismatch():
    with pytest.raises(ConfigError, match=r"parallel.pp\*ep\*dp=8 > topology devices=4"):
        from_config(two_nodes(), world_size=8)
    assert from_config(two_nodes(), world_size=3).n_devices == 3  # a job on part of a cluster


def test_presets_load_and_hetero_links():
    for name in ("local_cpu", "nvlink_8gpu", "ib_4x8", "ib_16x8", "hetero_a100_h100"):
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TopologyConfig), OmegaConf.load(ROOT / "conf/topology" / f"{name}.yaml")))
        t = from_config(cfg)
        assert t.n_devices == cfg.nodes * cfg.devices_per_node
    h = from_config(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TopologyConfig), OmegaConf.load(ROOT / "conf/topology/hetero_a100_h100.yaml"))))
    assert h.devices[0].tflops < h.devices[31].tflops
    assert h.bandwidth[0, 8] == 25 * GB  # A100 node to A100 node: HDR
    assert h.bandwidth[0, 31] == 25 * GB  # across generations: the slower end
    assert h.bandwidth[16, 24] == 50 * GB  # H100 to H100: NDR
    assert h.bandwidth[16, 17] == 450 * GB and h.bandwidth[0, 1] == 300 * GB


def test_detect_topology_from_env():
    t = detect_topology(8, env={"LOCAL_WORLD_SIZE": "4"}, use_cuda=False)
    assert t.n_devices == 8 and list(t.node_of) == [0, 0, 0, 0, 1, 1, 1, 1]
    t = detect_topology(6, env={"SLURM_NTASKS_PER_NODE": "2(x3)"}, use_cuda=False)
    assert t.n_nodes == 3
    t = detect_topology(4, env={}, use_cuda=False)
    assert t.n_nodes == 1 and t.devices[0].kind == "cpu"


PROBE = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from moepipe.placement.topology import probe_links
    dist.init_process_group("gloo")
    out = probe_links(large_bytes=1 << 18, iters=3)
    if dist.get_rank() == 0:
        print("PROBE" + json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.timeout(90)
def test_probe_two_gloo_processes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    procs = []
    import socket

    with socket.socket() as sock:  # a free port, so concurrent test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env_base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                    PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for r in range(2):
        procs.append(subprocess.Popen([sys.executable, str(script)], env=dict(env_base, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=80))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs
    import json

    line = next(l for l in outs[0][0].splitlines() if l.startswith("PROBE"))
    probe = json.loads(line[5:])
    bw = np.array(probe["bandwidth_gbps"])
    assert bw.shape == (2, 2) and bw[0, 1] > 0 and bw[0, 1] == bw[1, 0]
    assert probe["all_to_all_gbps"] > 0
    t = apply_probe(from_config(two_nodes(nodes=1, device_groups=[DeviceGroupConfig(count=2)])), probe)
    assert t.bandwidth[0, 1] == pytest.approx(bw[0, 1] * GB)
