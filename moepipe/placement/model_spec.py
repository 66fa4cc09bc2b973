"""What each block of the model costs: parameters, forward FLOPs per token, activation bytes
kept for backward, and the bytes a stage boundary sends. Derived from the config alone.

Counting conventions (see docs/SIMULATOR.md): a multiply-add is 2 FLOPs; elementwise ops,
norms and softmax are ignored; attention is causal, so a token attends (s+1)/2 keys on
average; SwiGLU has three d x h matrices; no biases.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moepipe.config import ModelConfig, MoEConfig, TrainConfig, moe_layer_ids


@dataclass(frozen=True)
class LayerSpec:
    index: int
    is_moe: bool
    params: int  # non-expert parameters: attention, norms, dense FFN or router + shared experts
    expert_params: int  # parameters of ONE routed expert (0 for dense blocks)
    matmul_flops: float  # forward FLOPs per token in weight matmuls (non-expert part)
    attn_core_flops: float  # forward FLOPs per token of QK^T and AV (no weights: backward is all input-grad)
    expert_flops: float  # forward FLOPs per routed token of one expert
    act_elems: float  # activation elements per token kept for backward (non-expert part)
    expert_act_elems: float  # activation elements per routed token kept for backward
    # lean W (parallel/weight_grad.py): elements per token kept from I to W, each nn.Linear's
    # input (one storage when Linears share it) and output gradient
    lean_w_elems: float = 0.0
    expert_lean_w_elems: float = 0.0  # per routed token of one expert


@dataclass(frozen=True)
class ModelSpec:
    layers: list[LayerSpec]
    vocab_size: int
    d_model: int
    seq_len: int
    tokens_per_microbatch: float  # per pipeline replica (one dp rank), before any EP split
    dtype_bytes: int
    num_experts: int
    top_k: int
    embed_params: int
    head_params: int  # final norm + output projection (counted even when tied: the last stage holds a copy)
    head_flops: float  # forward FLOPs per token of the output projection
    head_act_elems: float  # final-norm input/output and logits per token
    moe_layers: list[int] = field(default_factory=list)
    activation_checkpointing: bool = False  # backward recomputes the forward (costs F again in B)
    head_lean_w_elems: float = 0.0  # lean W: the output projection's input and output gradient per token

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_bytes_per_token(self) -> int:
        """Bytes of the hidden state per token: what a stage boundary and an MoE dispatch move."""
        return self.d_model * self.dtype_bytes

    def total_params(self) -> int:
        return (
            self.embed_params
            + self.head_params
            + sum(l.params + l.expert_params * (self.num_experts if l.is_moe else 0) for l in self.layers)
        )

    def active_params_per_token(self) -> int:
        return self.embed_params + self.head_params + sum(l.params + l.expert_params * (self.top_k if l.is_moe else 0) for l in self.layers)

    def forward_flops_per_token(self) -> float:
        """Whole-model forward FLOPs per token (top_k experts per MoE block)."""
        return self.head_flops + sum(l.matmul_flops + l.attn_core_flops + (self.top_k * l.expert_flops if l.is_moe else 0) for l in self.layers)


def swiglu_params(d: int, h: int) -> int:
    return 3 * d * h


def build_model_spec(
    model: ModelConfig,
    moe: MoEConfig,
    train: Optional[TrainConfig] = None,
    microbatches: int = 1,
    dp: int = 1,
    dtype_bytes: int = 2,
    activation_checkpointing: Optional[bool] = None,
) -> ModelSpec:
    seq = train.seq_len if train is not None else model.max_seq_len
    batch = train.batch_size if train is not None else 1
    ckpt = bool(train.activation_checkpointing) if activation_checkpointing is None and train is not None else bool(activation_checkpointing)
    d, n_heads = model.d_model, model.n_heads
    kv = (model.n_kv_heads or n_heads) * (d // n_heads)
    s_eff = (seq + 1) / 2  # mean keys per query under a causal mask
    moe_ids = set(moe_layer_ids(model, moe))
    E, k = moe.num_experts, moe.top_k
    h_sh = moe.shared_expert_hidden or moe.expert_hidden

    attn_params = 2 * d * d + 2 * d * kv + 2 * d  # Wq, Wo, Wk, Wv, two RMSNorm weights
    attn_matmul = 2 * (2 * d * d + 2 * d * kv)
    attn_core = 4 * d * s_eff  # QK^T and AV: 2 FLOPs x d x keys each
    # norm in/out, q, k, v, attention output (flash attention: no s x s probabilities kept)
    attn_act = 4 * d + 2 * kv + n_heads
    # lean W: wq/wk/wv's shared input and their output gradients, wo's input and output gradient
    # (the router's weight is no nn.Linear: its gradient is formed in I); a SwiGLU keeps w1/w3's
    # shared input, their two output gradients, w2's input and output gradient
    attn_lean = 4 * d + 2 * kv
    layers = []
    for i in range(model.n_layers):
        if i in moe_ids:
            shared = moe.num_shared_experts * swiglu_params(d, h_sh)
            params = attn_params + d * E + shared
            matmul = attn_matmul + 2 * d * E + 2 * shared
            act = attn_act + 2 * d + 2 * E + moe.num_shared_experts * 3 * h_sh
            lay = LayerSpec(i, True, params, swiglu_params(d, moe.expert_hidden), matmul, attn_core,
                            2 * swiglu_params(d, moe.expert_hidden), act, 2 * d + 3 * moe.expert_hidden,
                            attn_lean + (2 * d + 3 * moe.num_shared_experts * h_sh if moe.num_shared_experts else 0),
                            2 * d + 3 * moe.expert_hidden)
        else:
            ffn = swiglu_params(d, model.ffn_hidden)
            lay = LayerSpec(i, False, attn_params + ffn, 0, attn_matmul + 2 * ffn, attn_core, 0.0,
                            attn_act + 2 * d + 3 * model.ffn_hidden, 0.0, attn_lean + 2 * d + 3 * model.ffn_hidden, 0.0)
        if ckpt:  # only the block input survives; the rest is recomputed in backward
            lay = LayerSpec(lay.index, lay.is_moe, lay.params, lay.expert_params, lay.matmul_flops,
                            lay.attn_core_flops, lay.expert_flops, float(d), 0.0)
        layers.append(lay)
    return ModelSpec(
        layers=layers,
        vocab_size=model.vocab_size,
        d_model=d,
        seq_len=seq,
        tokens_per_microbatch=batch * seq / (dp * microbatches),
        dtype_bytes=dtype_bytes,
        num_experts=E,
        top_k=k if E else 0,
        embed_params=model.vocab_size * d,
        head_params=model.vocab_size * d + d,
        head_flops=2.0 * d * model.vocab_size,
        head_act_elems=2.0 * d + model.vocab_size,
        moe_layers=sorted(moe_ids),
        activation_checkpointing=ckpt,
        head_lean_w_elems=float(d + model.vocab_size),
    )
