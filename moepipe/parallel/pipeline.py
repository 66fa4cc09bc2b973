"""Pipeline schedules over plan-driven stages: torch.distributed.pipelining's schedule classes,
or moepipe's executor (parallel/executor.py) running the schedule's action lists."""
from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.pipelining import PipelineStage

from moepipe.parallel.executor import ScheduleExecutor, StreamExecutor
from moepipe.sim.schedules import order_traits, schedule_chains, schedule_program, two_bw_stream


def schedule_class(name: str) -> tuple[type, bool]:
    """(torch schedule class, multi-stage?) of schedule `name`: a built-in or a plug-in
    (moepipe.plugins, kind "schedule": a ScheduleSpec)."""
    from moepipe.plugins.registry import import_path, resolve

    spec = resolve("schedule", name)
    cls = import_path(spec.torch_class) if isinstance(spec.torch_class, str) else spec.torch_class
    return cls, bool(spec.multi_stage)


def build_schedule(
    name: str,
    modules: dict[int, torch.nn.Module],
    n_stages: int,
    microbatches: int,
    loss_fn: Callable,
    device: torch.device,
    pp_group,
    microbatch_shape: tuple[int, int],
    d_model: int,
    vocab_size: int,
    logits_dtype: torch.dtype = torch.float32,
    executor: str = "torch",
    stream_handlers: dict | None = None,
    chain_handlers: dict | None = None,
    lean_weight_grad: bool = False,
    seq_shards: int = 1,
):
    """`modules`: stage index -> module for the stages this rank holds (plan order). A
    schedule with two chains (chimera) also numbers the second replica's stages: stage
    n_stages + j runs plan stage j's layers; each chain is its own torch pipeline of
    n_stages stages (stage j of it), so first/last stage and peers are per chain.

    `executor`: "torch" builds the schedule's torch class; "moepipe" runs the action lists of
    `moepipe.sim.schedules.schedule_program` (the order the simulator simulates) on
    ScheduleExecutor. Both have the same `step(*args, target=..., losses=...)`.

    Gradients are not rescaled by the schedule (scale_grads=False): the loss function already
    divides by the microbatch count, as the single-process reference does, so both perform
    the same arithmetic.

    `stream_handlers` (WEIGHTS, REDUCE_GRAD: see StreamExecutor): for a schedule whose order
    declares `flush = False` (pipedream_2bw, one stage per rank), run it without a flush
    between steps on StreamExecutor; without them it runs one flushed iteration per step.

    `chain_handlers` (REDUCE_GRAD): a two-chain schedule's executor calls it with a stage id
    once that stage's gradient is complete (the replicas' all-reduce).

    `lean_weight_grad` (executor "moepipe"): split backwards keep only each Linear's input and
    output gradient from I to W (parallel/weight_grad.py), not the whole autograd graph.

    `seq_shards` (sequence parallelism): stages exchange 1/seq_shards of each microbatch's
    positions (the first stage takes the whole token sequence, the last outputs logits for every
    position: its head gathers them). Under TP `vocab_size` is the logits' split width V/tp.

    Stage input/output shapes are given up front (static metadata). Left to infer them, the
    engine runs an extra forward on uninitialised tensors, which would route garbage through
    the experts, run unmatched expert all-to-alls and pollute the routing statistics.
    """
    b, t = microbatch_shape
    held = t // seq_shards  # positions each stage's activations hold

    def hidden() -> torch.Tensor:
        # requires_grad marks the activations whose gradients travel back between stages
        return torch.empty(b, held, d_model, device="meta", requires_grad=True)

    def io(idx: int):
        inp = torch.empty(b, t, dtype=torch.long, device="meta") if idx == 0 else hidden()
        last = idx == n_stages - 1
        out = torch.empty(b, t, vocab_size, dtype=logits_dtype, device="meta", requires_grad=True) if last else hidden()
        return inp, out

    stages, ids = [], []
    for idx, module in sorted(modules.items()):
        inp, out = io(idx % n_stages)
        stages.append(PipelineStage(module, idx % n_stages, n_stages, device, input_args=(inp,), output_args=(out,), group=pp_group))
        ids.append(idx)
    if executor == "moepipe":
        pp = torch.distributed.get_world_size(pp_group)
        if n_stages % pp:
            raise ValueError(f"{n_stages} stages do not split over {pp} pipeline ranks")
        program = schedule_program(name, pp, n_stages // pp, microbatches)
        if schedule_chains(name) > 1:
            return ScheduleExecutor(dict(zip(ids, stages)), program, torch.distributed.get_rank(pp_group), loss_fn, chain_handlers)
        if stream_handlers is not None and not order_traits(name)[1]:
            if n_stages != pp:
                raise ValueError(f"schedule.name={name} runs without a flush with one stage per rank, got {n_stages} stages on {pp} ranks")
            return StreamExecutor({st.stage_index: st for st in stages}, program, two_bw_stream(pp, microbatches),
                                  torch.distributed.get_rank(pp_group), loss_fn, stream_handlers)
        return ScheduleExecutor({st.stage_index: st for st in stages}, program, torch.distributed.get_rank(pp_group), loss_fn,
                                lean_weight_grad=lean_weight_grad)
    if executor != "torch":
        raise ValueError(f"schedule.executor={executor!r} is not known: choose torch or moepipe")
    cls, multi_stage = schedule_class(name)
    if not multi_stage:
        if len(stages) != 1:
            raise ValueError(f"schedule.name={name} runs one stage per rank, got {len(stages)}: use an interleaved schedule")
        return cls(stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, microbatches, loss_fn=loss_fn, scale_grads=False)
