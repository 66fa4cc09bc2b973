"""Tensor parallelism of a built pipeline stage (parallel.tp), on torch.distributed.tensor.

After a stage is built from the plan (and its MoE layers attached to their EP group), its
dense parts are split over the TP group with `parallelize_module`:
- attention by heads: wq, wk, wv colwise (each rank computes n_heads/tp query heads and
  n_kv_heads/tp key/value heads), wo rowwise (partial sums, all-reduced to a replicated output);
- the dense SwiGLU and the shared experts: w1, w3 colwise, w2 rowwise;
- the embedding and the head by vocabulary: the embedding rowwise (each rank looks up its rows,
  the partial sums are all-reduced), the head colwise (logits [..., V/tp]), whose loss is
  `vocab_parallel_loss` (never gathers the logits);
- norms and the router stay replicated.

Routed experts are not split. An expert's GEMM is already small (its share of a microbatch's
tokens); splitting it over tp ranks would add two collectives per expert and shrink each GEMM
by tp again. Expert parallelism scales experts instead: every TP rank holds the experts of its
EP rank (replicated over the TP group) and dispatches a disjoint 1/tp of the tokens through the
EP group of ranks with its own TP index (`TokenSplitDispatcher`), so no token is sent tp times.

Gradients under TP (moepipe.parallel.grad_sync): sharded weights hold their shard's complete
gradient (`match_grad_layouts` cuts the embedding's replicated one to its rows); replicated
weights whose inputs are replicated and whose consumers end in a TP collective (norms) get
identical complete gradients on every TP rank; the router and the routed experts see only this
TP rank's share of the tokens' combine weights and tokens, so their gradients are summed over
the TP group (`tp_partial`). Every schedule runs under TP: PipeDream-2BW's weight versions swap
the local shards (moepipe.train.optim), Chimera's mirrored replicas sum their local gradient
shards per TP index (grad_sync.mirror_groups / MirrorReduce).

Sequence parallelism (parallel.sp, Megatron-style): between the split modules every activation
holds seq_len/tp positions: the embedding reduce-scatters its partial sums into sequence
shards, so norms, residual adds and the pipeline's messages run on the shard, and the head
all-gathers them (logits for every position, V/tp columns); attention, the dense SwiGLU and the
shared experts all-gather their input once (PrepareModuleInput, backward: reduce-scatter) and
reduce-scatter their rowwise output back to shards (instead of the all-reduce; backward:
all-gather). Attention sees the whole sequence, so the causal mask and rotary positions are
unchanged. A MoE layer's input is then this rank's disjoint 1/tp of the tokens: it routes and
dispatches them directly, with the balancing loss's expert counts summed over the TP group
(each shard's loss is its share of the whole microbatch's). Every replicated weight (the norms
too) holds only its shard's gradient and is summed over TP. Capacity-limited routing is refused
(a capacity counts the whole microbatch in token order).
"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from moepipe.model.router import Routing
from moepipe.parallel.migration import EntrySpec

# module (last name component) -> the weight dim TP splits: colwise layers split their output
# features (dim 0 of the [out, in] weight), rowwise layers their input features (dim 1)
_COLWISE, _ROWWISE = ("wq", "wk", "wv", "w1", "w3"), ("wo", "w2")
_BY_VOCAB = ("tok_embeddings.weight", "output.weight")  # [V, d] and [V, d]: rows of the vocabulary


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writes reach the DTensor), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def tp_partial(name: str, sp: bool = False) -> bool:
    """Replicated weights whose gradient each TP rank holds only its tokens' share of: the
    router and the routed experts; under sequence parallelism every replicated weight (the
    norms see only this rank's sequence shard)."""
    return (sp and shard_dim(name) is None) or ".router." in name or ".experts." in name


def match_grad_layouts(params: list[nn.Parameter]) -> None:
    """Give each TP-split parameter's gradient the parameter's own layout. The vocabulary-split
    embedding's backward yields a replicated (whole, identical) gradient for a Shard(0) weight;
    its local piece is this rank's rows (no communication), which the sync, the global norm and
    the optimizer expect."""
    for p in params:
        g = p.grad
        if g is not None and is_sharded(p) and is_sharded(g) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


def with_local_grads(params: list[nn.Parameter]) -> list[SimpleNamespace]:
    """Stand-ins whose .grad is the local gradient tensor, for torch's clip on mixed DTensor lists."""
    return [SimpleNamespace(grad=local(p.grad)) for p in params if p.grad is not None]


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the TP group (each rank's
    gradient covers only the tokens it dispatched, plus 1/tp of the replicated aux loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather of equal token chunks along dim 0; backward keeps this rank's chunk (the
    gradient arriving is the same on every TP rank: its consumers are replicated)."""

    @staticmethod
    def forward(ctx, chunk: torch.Tensor, group, tp: int, tp_rank: int) -> torch.Tensor:
        ctx.rows, ctx.tp_rank = chunk.shape[0], tp_rank
        parts = [torch.empty_like(chunk) for _ in range(tp)]
        dist.all_gather(parts, chunk.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo = ctx.rows * ctx.tp_rank
        return grad[lo : lo + ctx.rows], None, None, None


def token_chunk(routing: Routing, lo: int, hi: int, num_experts: int) -> Routing:
    """The assignments of tokens [lo, hi) with token indices relative to lo, still sorted by
    expert with the kept ones first; every other assignment becomes a dropped one (expert id
    E, weight 0, token 0), which the dispatchers cut off by the kept count."""
    tok, exp = routing.all_token_idx, routing.all_expert_idx
    mine = (tok >= lo) & (tok < hi) & (exp < num_experts)
    order = torch.argsort((~mine).to(torch.int8), stable=True)  # kept chunk assignments first, expert order kept
    mine = mine[order]
    expert_idx = torch.where(mine, exp[order], num_experts)
    kept = torch.zeros(num_experts + 1, dtype=routing.kept_counts.dtype, device=exp.device)
    kept.index_add_(0, expert_idx, torch.ones_like(expert_idx, dtype=kept.dtype))
    return replace(
        routing,
        all_token_idx=torch.where(mine, tok[order] - lo, 0),
        all_expert_idx=expert_idx,
        all_weights=torch.where(mine, routing.all_weights[order], 0.0),
        kept_counts=kept[:num_experts],
    )


class TokenSplitDispatcher:
    """Every TP rank routes all tokens (identical routing, capacity and aux loss); this one
    dispatches the assignments of its 1/tp of the tokens with the inner (local or EP)
    dispatcher and the TP group all-gathers the per-token results."""

    def __init__(self, inner, num_experts: int, tp: int, tp_rank: int, group):
        self.inner, self.num_experts, self.tp, self.tp_rank, self.group = inner, num_experts, tp, tp_rank, group

    def __call__(self, x: torch.Tensor, routing: Routing, experts: nn.ModuleDict) -> torch.Tensor:
        rows = x.shape[0] // self.tp
        if rows * self.tp != x.shape[0]:
            raise ValueError(f"{x.shape[0]} tokens do not split over parallel.tp={self.tp} (config validation names the fix)")
        lo = rows * self.tp_rank
        y = self.inner(x[lo : lo + rows], token_chunk(routing, lo, lo + rows, self.num_experts), experts)
        return _GatherFromTP.apply(y, self.group, self.tp, self.tp_rank)


def shard_dim(name: str) -> int | None:
    """The dim of state entry `name` (a global name) that TP splits, or None (replicated):
    attention projections, the dense SwiGLU, the shared experts, and the embedding and head by
    vocabulary (dim 0 of both); never routed experts, norms or the router."""
    if name in _BY_VOCAB:
        return 0
    parts = name.split(".")
    if parts[0] != "layers" or len(parts) < 5 or parts[-1] != "weight" or "experts" in parts:
        return None
    if parts[2] == "attn" or (parts[2] == "ffn" and (len(parts) == 5 or parts[3] == "shared")):
        return 0 if parts[-2] in _COLWISE else 1 if parts[-2] in _ROWWISE else None
    return None


def local_layout(layout: dict[str, EntrySpec], tp: int) -> dict[str, EntrySpec]:
    """The layout of one TP rank's state: split entries at 1/tp of their split dim (what a
    live migration moves, shard to shard, among ranks of the same TP index)."""
    out = {}
    for name, spec in layout.items():
        d = shard_dim(name) if tp > 1 else None
        shape = spec.shape if d is None else spec.shape[:d] + (spec.shape[d] // tp,) + spec.shape[d + 1 :]
        out[name] = EntrySpec(shape, spec.is_param)
    return out


def as_shard(name: str, t: torch.Tensor, mesh, full_shape: tuple[int, ...]) -> torch.Tensor:
    """This rank's local piece of split entry `name` as the DTensor it is a shard of (no
    communication); other entries unchanged."""
    d = shard_dim(name) if mesh.tp > 1 else None
    if d is None:
        return t
    from torch.distributed.tensor import DTensor, Shard

    stride = torch.empty(full_shape, device="meta").stride()
    return DTensor.from_local(t, mesh.tp_mesh, [Shard(d)], run_check=False, shape=torch.Size(full_shape), stride=stride)


def _seq_dim(split_module: str) -> int:
    """The dim a split module's input is sequence-sharded along under SP: [B, T/tp, d] for
    attention and the dense FFN; the MoE layer hands its shared experts flat [B*T/tp, d] rows
    (position-wise: the gathered row order need not be the sequence's)."""
    return 0 if split_module.endswith(".shared") else 1


def stage_plan(module: nn.Module, sp: bool = False) -> dict:
    """parallelize_module's plan for a stage: the FQN of each linear layer holding a split
    weight (`shard_dim`) -> ColwiseParallel (dim 0) or RowwiseParallel (dim 1); the embedding
    rowwise by vocabulary (each rank looks up its rows, the partial sums are all-reduced) and
    the head colwise (logits [..., V/tp] for `vocab_parallel_loss`).

    `sp` (sequence parallelism): the module holding the split layers (attention, dense FFN,
    shared experts) all-gathers its sequence-sharded input once (PrepareModuleInput: Shard ->
    Replicate, whose backward reduce-scatters the colwise layers' partial input gradients), and
    the rowwise layer reduce-scatters its partial sums back to sequence shards (instead of an
    all-reduce; backward: all-gather); the embedding reduce-scatters its partial sums into the
    first sequence shards and the head all-gathers the last."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    plan = {}
    for name, _ in module.named_parameters():
        d = shard_dim(name)
        if d is None:
            continue
        layer = name.rsplit(".", 1)[0]
        if name in _BY_VOCAB:  # embedding: masked lookup, partial sums; head: colwise, logits [.., V/tp]
            seq = Shard(1) if sp else Replicate()
            plan[layer] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq) if layer == "tok_embeddings" \
                else ColwiseParallel(input_layouts=seq)
            continue
        owner = layer.rsplit(".", 1)[0]
        if d == 0:
            plan[layer] = ColwiseParallel()
        else:
            plan[layer] = RowwiseParallel(output_layouts=Shard(_seq_dim(owner))) if sp else RowwiseParallel()
        if sp and owner not in plan:
            rest = (None, None) if owner.endswith(".attn") else ()  # attention also takes the rotary tables
            plan[owner] = PrepareModuleInput(input_layouts=(Shard(_seq_dim(owner)),) + rest, desired_input_layouts=(Replicate(),) + rest)
    return plan


def shard_stage(module: nn.Module, mesh, sp: bool = False) -> None:
    """Split the stage's attention and dense/shared FFN weights over the TP group (no-op when
    tp == 1). Called on the meta-device stage, before it is materialised: each rank allocates
    only its shards, and init_weights fills them with their piece of the by-name init, so no
    rank builds the whole stage and nothing is communicated (src_data_rank=None). `sp`: the
    split modules take and return sequence shards (stage_plan)."""
    if mesh.tp == 1:
        return
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(module, mesh.tp_mesh, stage_plan(module, sp), src_data_rank=None)
    for block in module.layers.values():
        block.attn.n_heads //= mesh.tp  # the attention reshapes by its local head counts
        block.attn.n_kv_heads //= mesh.tp


def split_moe_tokens(module: nn.Module, mesh, sp: bool = False) -> None:
    """Each MoE layer of the stage dispatches only this TP rank's share of the tokens (after
    attach_expert_group installed its EP dispatcher, which this wraps). No-op when tp == 1.
    `sp`: the layer's input already is this rank's sequence shard, so it routes and dispatches
    it directly (no split, no gather) and sums its routing counts over the TP group
    (`shard_sequence`)."""
    if mesh.tp == 1:
        return
    if sp:
        return shard_sequence(module, mesh)
    group = mesh.tp_group
    for _, moe in module.moe_layers():
        moe.tp_input = lambda x, g=group: _CopyToTP.apply(x, g)
        moe.dispatcher = TokenSplitDispatcher(moe.dispatcher, moe.num_experts, mesh.tp, mesh.tp_rank, group)


class _SumOverTP:
    """Sums a (non-differentiable) counter over the TP group: the routing counts of the
    balancing loss, whose tokens are spread over the group's sequence shards."""

    def __init__(self, group):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t


def shard_sequence(module: nn.Module, mesh) -> None:
    """Sequence parallelism of a stage's MoE layers (after shard_stage(..., sp=True), whose
    embedding hands on sequence shards, and the EP attach): each routes its shard (router,
    dispatch, EP group of this TP index unchanged), its balancing and z losses becoming this
    shard's share of the whole microbatch's (counts summed over the TP group)."""
    for _, moe in module.moe_layers():
        moe.token_shards, moe.sum_over_shards = mesh.tp, _SumOverTP(mesh.tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split by vocabulary over the TP group: this rank holds the
    columns [lo, lo + V/tp) of every token's logits. Three all-reduces of one number per token
    (max, sum of exponentials, the target's logit); the gradient, softmax - one-hot on this
    rank's columns, needs none. Never gathers [tokens x vocab]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, lo: int, group) -> torch.Tensor:
        ctx.dtype = logits.dtype
        x = logits.float().reshape(-1, logits.shape[-1])
        target = target.reshape(-1)
        top = x.max(-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        exp = (x - top[:, None]).exp()
        total = exp.sum(-1)
        dist.all_reduce(total, group=group)
        mine = (target >= lo) & (target < lo + x.shape[1])
        col = torch.where(mine, target - lo, 0)
        picked = torch.where(mine, x.gather(1, col[:, None]).squeeze(1) - top, 0.0)
        dist.all_reduce(picked, group=group)
        ctx.save_for_backward(exp / total[:, None], col, mine)
        ctx.shape = logits.shape
        return (total.log() - picked).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, col, mine = ctx.saved_tensors
        probs = probs.clone()
        rows = torch.arange(probs.shape[0], device=probs.device)
        probs[rows, col] -= mine.to(probs.dtype)
        return (probs * (grad / probs.shape[0])).to(ctx.dtype).reshape(ctx.shape), None, None, None


def vocab_parallel_loss(logits: torch.Tensor, target: torch.Tensor, mesh) -> torch.Tensor:
    """lm_loss of vocabulary-split logits [..., V/tp] (the head's colwise output): the same
    mean next-token cross-entropy in fp32, identical on every TP rank."""
    return _VocabParallelCrossEntropy.apply(logits, target, logits.shape[-1] * mesh.tp_rank, mesh.tp_group)
