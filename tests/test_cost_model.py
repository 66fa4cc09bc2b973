"""Model spec FLOPs/params against hand-computed values, and the cost model's times."""
import json

import numpy as np
import pytest

from moepipe.config import ConfigError, DeviceGroupConfig, ModelConfig, MoEConfig, TopologyConfig, TrainConfig, moe_layer_ids
from moepipe.placement.cost_model import CostModel, load_profile, routed_tokens, stage_costs
from moepipe.placement.model_spec import build_model_spec
from moepipe.placement.plan import static_plan
from moepipe.placement.topology import from_config

# d=8, 2 heads of 4, 1 kv head (GQA: kv dim 4), SwiGLU 16; block 1 is MoE: 4 experts of 6, top-2, 1 shared of 3
MODEL = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=16, max_seq_len=4)
MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=6, every=2, num_shared_experts=1, shared_expert_hidden=3)
TRAIN = TrainConfig(batch_size=4, seq_len=4)


def spec(**kw):
    return build_model_spec(MODEL, MOE, TRAIN, microbatches=2, dp=1, dtype_bytes=2, **kw)


def topo(n=2, tflops=1e-6, bw=1.0):
    # tflops=1e-6 -> 1e6 FLOP/s, easy arithmetic
    return from_config(TopologyConfig(nodes=1, devices_per_node=n, device_groups=[DeviceGroupConfig(count=n, tflops=tflops)],
                                      intra_node_bw_gbps=bw, intra_node_latency_us=0.0))


def test_spec_hand_computed():
    s = spec()
    assert moe_layer_ids(MODEL, MOE) == [1] and s.moe_layers == [1]
    l0, l1 = s.layers
    # attention: Wq, Wo 8x8; Wk, Wv 8x4; two norms of 8 -> 208 params; 2*(2*64 + 2*32) = 384 matmul FLOPs/token
    # causal core: 4 * d * (s+1)/2 = 4 * 8 * 2.5 = 80
    assert (l0.params, l0.matmul_flops, l0.attn_core_flops) == (208 + 384, 384 + 768, 80)
    # MoE block: router 8x4, shared SwiGLU 3*8*3 = 72; expert 3*8*6 = 144 params, 288 FLOPs per routed token
    assert (l1.params, l1.expert_params, l1.matmul_flops, l1.expert_flops) == (208 + 32 + 72, 144, 384 + 64 + 144, 288)
    assert s.head_flops == 2 * 8 * 16
    assert s.forward_flops_per_token() == 256 + (1152 + 80) + (592 + 80 + 2 * 288)
    assert s.total_params() == 128 + 136 + 592 + 312 + 4 * 144
    assert s.tokens_per_microbatch == 4 * 4 / 2 and s.hidden_bytes_per_token == 16
    # activations per token: attention 4d + 2kv + heads = 42; dense FFN 2d + 3h = 64
    assert l0.act_elems == 42 + 64
    assert spec(activation_checkpointing=True).layers[1].act_elems == 8


def test_phase_split_and_layer_time():
    cm = CostModel(spec(), efficiency=0.5)
    np.testing.assert_allclose(cm.dense_work[0], [1232, 1152 + 160, 1152])  # core backward is all input-grad
    np.testing.assert_allclose(cm.expert_work[1], [288, 288, 288])
    assert cm.layer_time(0, "F", tokens=100, flops_per_s=1e6) == pytest.approx(1232 * 100 / 5e5)
    assert cm.layer_time(1, "W", tokens=10, flops_per_s=1e6, routed_tokens=3) == pytest.approx((592 * 10 + 288 * 3) / 5e5)


def test_routed_tokens_and_replicas():
    s = spec()
    plan = static_plan(2, [1], 4, pp=1, ep=2)
    # 8 tokens per microbatch x top-2 = 16 assignments; proportions 1:1:1:5
    np.testing.assert_allclose(routed_tokens(plan, s, np.array([[1, 1, 1, 5]])), [[4, 12]])
    np.testing.assert_allclose(routed_tokens(plan, s, {1: [10, 10, 10, 50]}), [[4, 12]])
    np.testing.assert_allclose(routed_tokens(plan, s, None), [[8, 8]])
    plan.expert_map[1][3] = [0, 1]  # hot expert replicated: its 10 assignments split 5/5
    np.testing.assert_allclose(routed_tokens(plan, s, np.array([[1, 1, 1, 5]])), [[9, 7]])
    with pytest.raises(ConfigError, match=r"routing has shape \(2, 4\)"):
        routed_tokens(plan, s, np.ones((2, 4)))


def test_moe_layer_time_with_all_to_all():
    cm = CostModel(spec(), efficiency=0.5)
    t = topo(2, bw=1.0)
    # rank 0 gets 4 routed tokens, rank 1 gets 12; each holds 4 of the 8 tokens for the dense part
    # forward dense work of block 1 = 592 matmul + 80 attention core FLOPs per token
    comp = max(672 * 4 + 288 * 4, 672 * 4 + 288 * 12) / 5e5
    # dispatch: member j receives routed_j * 16 bytes, half from its peer; slowest stream: rank 1 receives 96 B at 1 GB/s
    a2a = 12 * 16 / 2 / 1e9
    assert cm.moe_layer_time(1, "F", 4, [4, 12], [0, 1], t) == pytest.approx(comp + 2 * a2a)
    assert cm.moe_layer_time(1, "W", 4, [4, 12], [0, 1], t) == pytest.approx((592 * 4 + 288 * 12) / 5e5)


def test_stage_costs_two_stages():
    s = spec()
    cm = CostModel(s, efficiency=0.5)
    plan = static_plan(2, [1], 4, pp=2, ep=1)
    c = stage_costs(cm, plan, topo(2), free_comm=True)
    np.testing.assert_allclose(c.comp[0], np.array([1232, 1312, 1152]) * 8 / 5e5)
    np.testing.assert_allclose(c.comp[1], (np.array([672, 752, 592]) * 8 + 288 * 16 + 256 * 8) / 5e5)
    assert c.a2a.sum() == 0 and c.send.sum() == 0 and c.grad_sync_s == 0
    c2 = stage_costs(cm, plan, topo(2, bw=1.0))
    assert c2.send[0] == pytest.approx(8 * 16 / 1e9) and c2.send[1] == 0
    # activation bytes per in-flight microbatch on stage 0: 8 tokens x 106 elements x 2 bytes
    assert c.act_bytes[0, 0, 0] == pytest.approx(8 * 106 * 2)
    ck = stage_costs(CostModel(spec(activation_checkpointing=True)), plan, topo(2), free_comm=True)
    assert ck.comp[0, 1] == pytest.approx(c.comp[0, 1] + c.comp[0, 0])  # backward recomputes forward


def test_profile_calibration(tmp_path):
    s = spec()
    prof = {
        "version": 1,
        "device": {"name": "cpu", "tflops": 1e-6, "speed": 1.0},
        "tokens_per_microbatch": 8,
        "layers": {"0": {"fwd_s": 0.01, "bwd_input_s": 0.02, "bwd_weight_s": 0.015}, "1": {"fwd_s": 0.004, "bwd_s": 0.008}},
        "head": {"fwd_s": 0.001, "bwd_input_s": 0.001, "bwd_weight_s": 0.001},
        "expert_per_token_s": {"fwd_s": 1e-4, "bwd_input_s": 1e-4, "bwd_weight_s": 1e-4},
    }
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    cm = CostModel(s, efficiency=0.5, profile=str(path))
    plan = static_plan(2, [1], 4, pp=2, ep=1)
    c = stage_costs(cm, plan, topo(2), free_comm=True)
    np.testing.assert_allclose(c.comp[0], [0.01, 0.02, 0.015])  # same device, same tokens: measured times back
    # layer 1 bwd_s split evenly by the analytic B:W ratio default (1:1); experts: 16 routed tokens x 1e-4 s
    np.testing.assert_allclose(c.comp[1], [0.004 + 0.001 + 16e-4, 0.004 + 0.001 + 16e-4, 0.004 + 0.001 + 16e-4])
    fast = stage_costs(cm, plan, topo(2, tflops=2e-6), free_comm=True)
    np.testing.assert_allclose(fast.comp, c.comp / 2)  # twice the throughput, half the time
    with pytest.raises(ConfigError, match="profile.layers"):
        load_profile({"device": {"tflops": 1}, "tokens_per_microbatch": 1, "layers": {"0": {"bwd_s": 1}}})
