"""What tensor parallelism adds to, and divides in, a block's cost (issue 17). Pure numpy.

Under `parallel.tp` the placers and the simulator see one device per TP group
(`topology.tp_groups`: tp GPUs inside a node, tp x the FLOP/s, tp x the link to another group,
memory per GPU), so compute divides by tp without anything here. This module holds the rest:

* TP collectives (Megatron style): every block all-reduces its activations [tokens x d_model]
  twice in the forward (after attention's row-parallel output projection and after the FFN /
  MoE output) and twice in the backward (the input gradients of the column-parallel inputs);
  the weight-gradient pass (W) has none. A ring all-reduce of n bytes over tp GPUs takes
  2(tp-1) (alpha + n / (tp beta)) on the group's slowest ring hop. With sequence parallelism
  each all-reduce becomes a reduce-scatter plus an all-gather of the same bytes: the same time.
* Memory per GPU: dense parameters (attention, dense FFN, shared experts, embedding and the
  output head, split by vocabulary) with their gradients and AdamW state divide by tp; the
  norms and the router stay whole on every GPU. Routed experts are not TP-split (they use
  EP): every GPU of a group holds the group's experts in full and runs them on its 1/tp of the
  routed tokens, so expert memory does not divide, and expert activations do (1/tp of the
  tokens). Activations of the TP-split parts (q, k, v, attention output, FFN/shared-expert
  hidden, logits) divide by tp; the norms' inputs/outputs and router logits divide only under
  sequence parallelism; with activation checkpointing the kept block input likewise.
* Gradient sync: the experts (and the replicated norms and router) are the same weights on
  every GPU of the group, so their gradients are all-reduced over the TP ring once per step.

Assumptions: TP collectives do not overlap with compute (they block the stage's compute
lane; DualPipeV's overlapped pairs hide only the all-to-alls); the embedding lookup's and the
vocabulary-parallel loss's small collectives are ignored; the dense gradients' data-parallel
all-reduce runs per TP rank on its 1/tp shard over its own port (the group link is tp x one).
tp = 1 changes nothing: every function returns the untouched figure.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from moepipe.placement.model_spec import LayerSpec, ModelSpec

ALL_REDUCES_PER_BLOCK = np.array([2.0, 2.0, 0.0])  # (F, B, W) activation all-reduces per block
TP_SIZES = (1, 2, 4, 8)  # the tensor-parallel sizes the mesh search considers (inside a node)


def ring_all_reduce_time(nbytes: Any, tp: int, bandwidth: Any, latency: Any = 0.0) -> Any:
    """Seconds of a ring all-reduce of `nbytes` over `tp` GPUs: 2(tp-1) steps of nbytes/tp over a
    hop of `bandwidth` bytes/s and `latency` s (also reduce-scatter + all-gather, as under
    sequence parallelism). Vectorised over bandwidth/latency. 0 for tp <= 1."""
    if tp <= 1:
        return np.zeros(np.shape(bandwidth)) if np.ndim(bandwidth) else 0.0
    return 2 * (tp - 1) * (np.asarray(latency, dtype=np.float64) + np.asarray(nbytes, dtype=np.float64) / (tp * np.asarray(bandwidth, dtype=np.float64)))


def block_collective_bytes(spec: ModelSpec, tokens: float) -> float:
    """Bytes of one TP all-reduce in a block: the activations [tokens x d_model]."""
    return float(tokens) * spec.hidden_bytes_per_token


def block_tp_seconds(spec: ModelSpec, tokens: float, tp: int, ring_bandwidth: Any, ring_latency: Any) -> np.ndarray:
    """[3, *shape of ring_bandwidth] seconds of one block's TP collectives per phase (F, B, W)
    for a microbatch of `tokens` on groups with the given ring hop."""
    t = ring_all_reduce_time(block_collective_bytes(spec, tokens), tp, ring_bandwidth, ring_latency)
    return ALL_REDUCES_PER_BLOCK.reshape((3,) + (1,) * np.ndim(t)) * np.asarray(t)[None]


def tp_block_seconds_on(spec: ModelSpec, tokens: float, topology: Any, ranks: Any) -> np.ndarray:
    """[3, *ranks.shape] one block's TP collective seconds on each group device `ranks` of a
    `tp_groups` topology (zeros when topology.tp == 1)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if topology.tp <= 1:
        return np.zeros((3,) + ranks.shape)
    return block_tp_seconds(spec, tokens, topology.tp, topology.tp_ring_bandwidth[ranks], topology.tp_ring_latency[ranks])


# ------------------------------------------------------------------ memory per GPU


def replicated_params(layer: LayerSpec, spec: ModelSpec) -> float:
    """Parameters of a block every TP rank holds whole: the two RMSNorm weights and the router."""
    return 2.0 * spec.d_model + (spec.d_model * spec.num_experts if layer.is_moe else 0.0)


def dense_params_per_gpu(layer: LayerSpec, spec: ModelSpec, tp: int) -> float:
    """A block's non-expert parameters on one GPU of its TP group."""
    if tp <= 1:
        return layer.params
    rep = replicated_params(layer, spec)
    return (layer.params - rep) / tp + rep


def embed_params_per_gpu(spec: ModelSpec, tp: int) -> float:
    return spec.embed_params if tp <= 1 else spec.embed_params / tp  # split by vocabulary


def head_params_per_gpu(spec: ModelSpec, tp: int) -> float:
    if tp <= 1:
        return spec.head_params
    return (spec.head_params - spec.d_model) / tp + spec.d_model  # output split by vocabulary; final norm whole


def act_elems_per_gpu(layer: LayerSpec, spec: ModelSpec, tp: int, sequence_parallel: bool = False) -> float:
    """Activation elements per token (of the group's microbatch) one GPU keeps for a block's
    non-expert part."""
    if tp <= 1:
        return layer.act_elems
    if sequence_parallel:
        return layer.act_elems / tp
    if spec.activation_checkpointing:
        return layer.act_elems  # the kept block input is replicated without sequence parallelism
    rep = 4.0 * spec.d_model + (2.0 * spec.num_experts if layer.is_moe else 0.0)  # two norms' in/out; router logits and probabilities
    return (layer.act_elems - rep) / tp + rep


def head_act_elems_per_gpu(spec: ModelSpec, tp: int, sequence_parallel: bool = False) -> float:
    if tp <= 1:
        return spec.head_act_elems
    if sequence_parallel:
        return spec.head_act_elems / tp
    rep = 2.0 * spec.d_model  # final norm in/out; the logits are split by vocabulary
    return (spec.head_act_elems - rep) / tp + rep


def expert_share_per_gpu(tp: int) -> float:
    """The share of a group's routed tokens (and their expert activations) one GPU handles."""
    return 1.0 if tp <= 1 else 1.0 / tp


def tp_grad_sync_time(replicated_bytes: Any, topology: Any, ranks: Any) -> float:
    """The slowest group's all-reduce, over its TP ring, of the gradients every GPU of the group
    holds whole (its experts, norms and router): `replicated_bytes` per group device `ranks`."""
    if topology.tp <= 1:
        return 0.0
    ranks = np.asarray(ranks, dtype=np.int64)
    t = ring_all_reduce_time(np.asarray(replicated_bytes, dtype=np.float64), topology.tp, topology.tp_ring_bandwidth[ranks],
                             topology.tp_ring_latency[ranks])
    return float(np.max(t)) if np.size(t) else 0.0
