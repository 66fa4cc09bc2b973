"""moepipe's schedule executor: runs one pipeline rank's action list (a moepipe.sim.actions
Program) over torch PipelineStages.

Why our own: torch's runtime validates that every stage runs every microbatch and has no
action for an optimizer step inside an iteration, so bidirectional (Chimera) and asynchronous
(PipeDream-2BW) schedules cannot be expressed there. The compute and point-to-point messages
are torch's: `PipelineStage.forward_one_chunk / backward_one_chunk / backward_weight_one_chunk`
and the stage's `get_{fwd,bwd}_{send,recv}_ops` (its receive buffers, its peers), so a schedule
run here performs the same arithmetic as under torch's classes (bitwise on CPU for the same
compute order). Stage set-up (the warm-up exchange and the static shape metadata) is torch's
`_initialize_pp_stages`, inherited from its schedule base class.

Drop-in for a torch schedule: `step(*args, target=..., losses=[...])`. Each action is compiled
once into a closure over its stage, microbatch and neighbours, so a step is a loop of calls
without per-action lookups, logging or profiler ranges.

Stage operations: REDUCE_GRAD calls `handlers["REDUCE_GRAD"](stage)` when given (the gradient
all-reduce over a stage's replicas), else does nothing (this runtime syncs gradients after the
step); STEP calls `handlers["STEP"](stage)` (a per-stage optimizer step) and must be given.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _split_tensor
from torch.distributed.pipelining.schedules import _PipelineSchedule

from moepipe.sim.actions import Action, Program


def _post(ops: list) -> list:
    """Post torch P2POps one by one (non-blocking); their Work handles."""
    return [op.op(op.tensor, op.peer, op.group, op.tag) for op in ops]


class ScheduleExecutor(_PipelineSchedule):
    """`stages`: stage id -> the PipelineStage this rank holds; `program` the whole schedule;
    `rank` this rank's index in the pipeline group."""

    def __init__(self, stages: dict[int, Any], program: Program, rank: int, loss_fn: Optional[Callable] = None,
                 handlers: Optional[dict[str, Callable[[int], None]]] = None, scale_grads: bool = False):
        if scale_grads:
            raise ValueError("ScheduleExecutor does not rescale gradients: divide the loss by the microbatch count instead")
        super().__init__(program.microbatches, loss_fn=loss_fn, scale_grads=False)
        self.program, self.rank = program, rank
        self.stages = dict(stages)
        held = sorted(s for s, r in enumerate(program.stage_to_rank) if r == rank)
        if sorted(self.stages) != held:
            raise ValueError(f"pipeline rank {rank} holds stages {sorted(self.stages)}, but the schedule runs {held} there")
        self._stage_list = [self.stages[s] for s in held]
        mapping = dict(enumerate(program.stage_to_rank))
        for st in self._stage_list:
            st.stage_index_to_group_rank = mapping  # where torch's P2P ops find each peer stage
        self.handlers = dict(handlers or {})
        self._fwd_init = self._bwd_init = False
        self._recv: dict[tuple, list] = {}
        self._sends: list = []
        self._last: Optional[set] = None
        self._ops = [self._compile(a) for a in program.actions[rank]]
        self._fwd_ops = [op for op, a in zip(self._ops, program.actions[rank]) if a.kind in ("F", "SEND_F", "RECV_F")]

    # ------------------------------------------------------------------ compilation

    def _compile(self, a: Action) -> Callable[[], None]:
        prog, stages = self.program, self.stages
        if a.kind == "FB":
            f, b = (self._compile(x) for x in a.pair)

            def pair() -> None:
                f()
                b()
            return pair
        s, mb = a.stage, a.mb
        st = stages.get(s)
        if a.kind in ("SEND_F", "SEND_B"):
            get = st.get_fwd_send_ops if a.kind == "SEND_F" else st.get_bwd_send_ops
            sends = self._sends
            return lambda: sends.append(_post(get(mb)))
        if a.kind in ("RECV_F", "RECV_B"):
            get = st.get_fwd_recv_ops if a.kind == "RECV_F" else st.get_bwd_recv_ops
            recv, key = self._recv, (a.kind[-1], s, mb)
            return lambda: recv.__setitem__(key, _post(get(mb)))
        if a.kind in ("REDUCE_GRAD", "STEP"):
            fn = self.handlers.get(a.kind)
            if fn is None and a.kind == "STEP":
                raise ValueError(f"the schedule runs {a} but the executor was given no STEP handler (the per-stage optimizer step)")
            return (lambda: None) if fn is None else (lambda: fn(s))
        prv, nxt = prog.prev(s), prog.next(s)
        local_prev = stages.get(prv) if prv is not None else None
        local_next = stages.get(nxt) if nxt is not None else None
        if a.kind == "F":
            wait = (prv is not None and local_prev is None) and ("F", s, mb)
            return self._forward(st, mb, wait, local_next, is_last=nxt is None)
        if a.kind in ("B", "I"):
            wait = (nxt is not None and local_next is None) and ("B", s, mb)
            last = a.kind == "B" and self._is_last_backward(a)
            return self._backward(st, mb, wait, local_prev, full=a.kind == "B", last=last, is_last=nxt is None)
        if a.kind == "W":
            last = self._is_last_backward(a)
            return lambda: st.backward_weight_one_chunk(mb, last_backward=last)
        raise ValueError(f"the executor cannot run action {a}")

    def _is_last_backward(self, a: Action) -> bool:
        """Whether `a` (B or W) is its stage's last gradient contribution of the step (as torch's
        runtime counts: the n-th B or W of a stage that runs n microbatches' backwards)."""
        if self._last is None:
            seen: dict[int, int] = {}
            self._last = set()
            for x in self.program.actions[self.rank]:
                for y in x.leaves():
                    if y.kind in ("B", "W"):
                        seen[y.stage] = seen.get(y.stage, 0) + 1
                        if seen[y.stage] == self.program.backwards[y.stage]:
                            self._last.add(y)
        return a in self._last

    def _forward(self, st, mb: int, wait, local_next, is_last: bool) -> Callable[[], None]:
        recv = self._recv

        def run() -> None:
            if wait:
                for w in recv.pop(wait):
                    w.wait()
            out = st.forward_one_chunk(mb, self._arg_mbs[mb], self._kwarg_mbs[mb], save_forward_output=self._return_outputs)
            if is_last and self._loss_fn is not None and self._target_mbs is not None:
                self._losses[mb] = self._compute_loss(out, self._target_mbs[mb], self._loss_kwargs)
            if local_next is not None:
                local_next.set_local_fwd_input(out, mb)
        return run

    def _backward(self, st, mb: int, wait, local_prev, full: bool, last: bool, is_last: bool) -> Callable[[], None]:
        recv = self._recv

        def run() -> None:
            if wait:
                for w in recv.pop(wait):
                    w.wait()
            loss = self._losses[mb] if is_last and self._loss_fn is not None else None
            st.backward_one_chunk(mb, loss=loss, full_backward=full, last_backward=last)
            if local_prev is not None:
                local_prev.set_local_bwd_input(st.get_local_bwd_output(mb), mb)
        return run

    # ------------------------------------------------------------------ one step

    def step(self, *args, target=None, losses: Optional[list] = None, return_outputs: bool = True,
             loss_kwargs: Optional[dict] = None, **kwargs):
        """Split the batch into microbatches and run this rank's actions; `losses` receives the
        losses of the microbatches whose last stage is here, in microbatch order."""
        if self._has_backward and not torch.is_grad_enabled():
            raise RuntimeError("step() needs gradients enabled; use eval() for forward-only runs")
        for st in self._stage_list:
            st.has_backward = self._has_backward
            st.clear_runtime_states()
        arg_mbs, kwarg_mbs = self._split_inputs(args, kwargs)
        targets = list(_split_tensor(target, TensorChunkSpec(0), self._n_microbatches)) if target is not None else None
        self._step_microbatches(arg_mbs, kwarg_mbs, targets, losses, return_outputs, loss_kwargs)
        for st in self._stage_list:
            if st.is_last and return_outputs:
                return self._merge_outputs(st.output_chunks)
        return None

    def _step_microbatches(self, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None, return_outputs=True, loss_kwargs=None):
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        self._fwd_init, self._bwd_init = self._initialize_pp_stages(
            self._stage_list, arg_mbs[0], kwarg_mbs[0], target_mbs[0] if target_mbs is not None else None,
            self._fwd_init, self._bwd_init, loss_kwargs=loss_kwargs)
        self._arg_mbs, self._kwarg_mbs, self._target_mbs = arg_mbs, kwarg_mbs, target_mbs
        self._return_outputs, self._loss_kwargs = return_outputs, loss_kwargs
        self._losses: list = [None] * self._n_microbatches
        self._recv.clear()
        try:
            for op in self._ops if self._has_backward else self._fwd_ops:
                op()
            for works in self._sends:  # long done in practice; waited for so nothing outlives the step
                for w in works:
                    w.wait()
        finally:
            self._sends.clear()
            self._arg_mbs = self._kwarg_mbs = self._target_mbs = None
        if self._recv:
            raise RuntimeError(f"pipeline rank {self.rank}: receives {sorted(self._recv)} were posted but never used")
        if losses is not None and any(st.is_last for st in self._stage_list):
            losses.clear()
            losses.extend(x for x in self._losses if x is not None)
        self._losses = []


def make_executor(stages: list, program: Program, rank: int, loss_fn: Optional[Callable],
                  handlers: Optional[dict[str, Callable[[int], None]]] = None) -> ScheduleExecutor:
    """An executor over PipelineStages built for `program` (stage ids = their stage_index)."""
    return ScheduleExecutor({st.stage_index: st for st in stages}, program, rank, loss_fn, handlers)


__all__ = ["ScheduleExecutor", "make_executor"]
