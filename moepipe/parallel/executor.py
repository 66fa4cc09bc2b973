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

from moepipe.parallel.weight_grad import LeanWeightGrad
from moepipe.sim.actions import Action, Program


def _post(ops: list) -> list:
    """Post torch P2POps one by one (non-blocking); their Work handles."""
    return [op.op(op.tensor, op.peer, op.group, op.tag) for op in ops]


def st_id(st, stages: dict) -> Optional[int]:
    """The stage id under which the executor holds PipelineStage `st`."""
    return next((s for s, x in stages.items() if x is st), None)


class ScheduleExecutor(_PipelineSchedule):
    """`stages`: stage id -> the PipelineStage this rank holds; `program` the whole schedule;
    `rank` this rank's index in the pipeline group."""

    def __init__(self, stages: dict[int, Any], program: Program, rank: int, loss_fn: Optional[Callable] = None,
                 handlers: Optional[dict[str, Callable[[int], None]]] = None, scale_grads: bool = False,
                 lean_weight_grad: bool = False):
        if scale_grads:
            raise ValueError("ScheduleExecutor does not rescale gradients: divide the loss by the microbatch count instead")
        super().__init__(program.microbatches, loss_fn=loss_fn, scale_grads=False)
        self.program, self.rank = program, rank
        self.stages = dict(stages)
        held = sorted(s for s, r in enumerate(program.stage_to_rank) if r == rank)
        if sorted(self.stages) != held:
            raise ValueError(f"pipeline rank {rank} holds stages {sorted(self.stages)}, but the schedule runs {held} there")
        self._stage_list = [self.stages[s] for s in held]
        L = program.chain_len
        for s in held:  # where torch's P2P ops find each peer stage: a chain is one torch pipeline
            c, st = s // L, self.stages[s]
            if st.stage_index != s % L:
                raise ValueError(f"stage {s} is stage {s % L} of chain {c}, but its PipelineStage says {st.stage_index}")
            st.stage_index_to_group_rank = {k: program.stage_to_rank[c * L + k] for k in range(L)}
        self.handlers = dict(handlers or {})
        # lean W (parallel/weight_grad.py): stages that run split backwards keep only each
        # Linear's input and output gradient from I to W, not the whole graph
        split = {y.stage for a in program.actions[rank] for y in a.leaves() if y.kind == "I"}
        self.lean: dict[int, LeanWeightGrad] = {}
        if lean_weight_grad:
            for s in sorted(split):
                lean = self.lean[s] = LeanWeightGrad(self.stages[s].submod)
                self.stages[s].dw_builder = lambda lean=lean: lean.runner(lean.bwd_mb)
        self._fwd_init = self._bwd_init = False
        self._recv: dict[tuple, list] = {}
        self._sends: list = []
        self._last: Optional[set] = None
        self._ops = [self._compile(a) for a in program.actions[rank]]
        # forward-only runs: the forward actions, including the forward half of an overlapped pair
        fwd = [x for a in program.actions[rank] for x in a.leaves() if x.kind in ("F", "SEND_F", "RECV_F")]
        self._fwd_ops = [self._compile(a) for a in fwd]

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
        recv, lean = self._recv, self.lean.get(st_id(st, self.stages))

        def run() -> None:
            if wait:
                for w in recv.pop(wait):
                    w.wait()
            if lean is not None:
                lean.mb = mb
            try:
                out = st.forward_one_chunk(mb, self._arg_mbs[mb], self._kwarg_mbs[mb], save_forward_output=self._return_outputs)
            finally:
                if lean is not None:
                    lean.mb = None
            if is_last and self._loss_fn is not None and self._target_mbs is not None:
                self._losses[mb] = self._compute_loss(out, self._target_mbs[mb], self._loss_kwargs)
            if local_next is not None:
                local_next.set_local_fwd_input(out, mb)
        return run

    def _backward(self, st, mb: int, wait, local_prev, full: bool, last: bool, is_last: bool) -> Callable[[], None]:
        recv, lean = self._recv, self.lean.get(st_id(st, self.stages))

        def run() -> None:
            if wait:
                for w in recv.pop(wait):
                    w.wait()
            if lean is not None:
                lean.bwd_mb = mb
            loss = self._losses[mb] if is_last and self._loss_fn is not None else None
            st.backward_one_chunk(mb, loss=loss, full_backward=full, last_backward=last)
            if loss is not None:  # the loss's graph nodes (and what they reference) go now, not at the step's end
                self._losses[mb] = loss.detach()
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
        for lean in self.lean.values():
            lean.clear()
            lean.active = self._has_backward
        arg_mbs, kwarg_mbs = self._split_inputs(args, kwargs)
        targets = list(_split_tensor(target, TensorChunkSpec(0), self._n_microbatches)) if target is not None else None
        try:
            self._step_microbatches(arg_mbs, kwarg_mbs, targets, losses, return_outputs, loss_kwargs)
        finally:
            for lean in self.lean.values():  # a forward outside a step computes as usual
                lean.active = False
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
        self._end_step(losses)

    def _end_step(self, losses) -> None:
        """Every posted receive was used; hand the last stage's losses over in microbatch order."""
        if self._recv:
            raise RuntimeError(f"pipeline rank {self.rank}: receives {sorted(self._recv)} were posted but never used")
        if losses is not None and any(st.is_last for st in self._stage_list):
            losses.clear()
            losses.extend(x for x in self._losses if x is not None)
        self._losses = []


class StreamExecutor(ScheduleExecutor):
    """PipeDream-2BW without a flush (one stage per rank): step t runs the lists of
    `moepipe.sim.schedules.two_bw_stream`, so the last warm-up depth of backwards of batch t-1
    run inside step t, interleaved with batch t's forwards, and nothing drains in between.

    Microbatch slots: batch b's microbatch i is slot (b % 2) * m + i (two batches are in
    flight; torch's stage keeps per-slot state, so its infrastructure is built for 2m slots
    and its runtime state is cleared only after `drain()`). Weight versions: before a compute
    action of batch b the executor calls `handlers["WEIGHTS"](stage, (b + 1) % 2)` (batch b
    runs with W(b-1), kept in buffer (b - 1) % 2); after a stage's last backward of batch b it
    calls `handlers["REDUCE_GRAD"](stage, b)` (that batch's gradient is complete there).
    `batch` is the batch the last step ran; `drain()` finishes the in-flight backwards."""

    def __init__(self, stages: dict[int, Any], program: Program, phases: dict[str, dict[int, list[Action]]], rank: int,
                 loss_fn: Optional[Callable], handlers: dict[str, Callable]):
        self.m = program.microbatches
        super().__init__(stages, program, rank, loss_fn)  # the flushed program: stage map, forward-only order
        missing = {"WEIGHTS", "REDUCE_GRAD"} - set(handlers)
        if missing:
            raise ValueError(f"the 2BW stream executor needs handlers {sorted(missing)}")
        self.stream_handlers = dict(handlers)
        self.phases = phases
        self.batch = -1  # the batch the last step ran
        self._restart = True  # the pipeline is empty: the next step is a 'first' iteration
        self._compiled: dict[tuple[str, int], list] = {}
        self._prev_sends: list = []

    def _is_last_backward(self, a: Action) -> bool:
        return a.mb % self.m == self.m - 1

    def _stream_ops(self, phase: str, parity: int) -> list:
        """`phase`'s list with slots for a step whose batch has `parity` (drain: of the batch after)."""
        key = (phase, parity)
        if key not in self._compiled:
            m, ops = self.m, []
            for a in self.phases[phase][self.rank]:
                if a.kind == "REDUCE_GRAD":
                    ops.append(self._reduce(a.stage))
                    continue
                rel = a.mb // m  # 0: the previous batch, 1: this step's
                b_par = (parity + rel + 1) % 2
                slot = b_par * m + a.mb % m
                op = self._compile(Action(a.kind, a.stage, slot))
                if a.kind in ("F", "B"):
                    op = self._versioned(op, a.stage, (b_par + 1) % 2, slot if a.kind == "B" else None)
                ops.append(op)
            self._compiled[key] = ops
        return self._compiled[key]

    def _versioned(self, op, stage: int, version: int, freed_slot: Optional[int]) -> Callable[[], None]:
        bind, st = self.stream_handlers["WEIGHTS"], self.stages[stage]

        def run() -> None:
            bind(stage, version)
            op()
            if freed_slot is not None:  # the slot's receive buffers are reused two batches on: drop their input gradients
                for info in st.args_recv_info.get(freed_slot, ()):
                    if not info.is_root_arg and info.buffer is not None:
                        info.buffer.grad = None
        return run

    def _reduce(self, stage: int) -> Callable[[], None]:
        fn = self.stream_handlers["REDUCE_GRAD"]
        return lambda: fn(stage, self._reduce_batch)

    def step(self, *args, target=None, losses: Optional[list] = None, return_outputs: bool = False,
             loss_kwargs: Optional[dict] = None, **kwargs):
        if not torch.is_grad_enabled():
            raise RuntimeError("step() needs gradients enabled")
        m = self.m
        for st in self._stage_list:
            st.has_backward = True
            if self._restart:
                st.clear_runtime_states()
        arg_mbs, kwarg_mbs = self._split_inputs(args, kwargs)
        targets = list(_split_tensor(target, TensorChunkSpec(0), m)) if target is not None else None
        if not self._fwd_init or not self._bwd_init:  # per-slot receive buffers and metadata: 2m slots
            self._n_microbatches = 2 * m
            try:
                self._fwd_init, self._bwd_init = self._initialize_pp_stages(
                    self._stage_list, arg_mbs[0], kwarg_mbs[0], targets[0] if targets is not None else None,
                    self._fwd_init, self._bwd_init, loss_kwargs=loss_kwargs)
            finally:
                self._n_microbatches = m
        self.batch += 1
        phase = "first" if self._restart else "steady"
        self._arg_mbs, self._kwarg_mbs = arg_mbs * 2, kwarg_mbs * 2  # slot -> its microbatch's inputs
        self._target_mbs = targets * 2 if targets is not None else None
        self._return_outputs, self._loss_kwargs = False, loss_kwargs  # outputs are never merged: nothing piles up
        self._losses = [None] * (2 * m)
        self._reduce_batch = self.batch - 1  # REDUCE_GRAD in a step list: the previous batch's, or this one's (below)
        try:
            for op in self._run_list(phase, self.batch % 2):
                op()
            for works in self._prev_sends:  # a send's receiver runs at the latest in the step after it
                for w in works:
                    w.wait()
        finally:
            self._prev_sends, self._sends[:] = list(self._sends), []
            self._arg_mbs = self._kwarg_mbs = self._target_mbs = None
        self._restart = False
        self._end_step(losses)
        return None

    def _run_list(self, phase: str, parity: int):
        """The ops, keeping `_reduce_batch` right: a REDUCE_GRAD after a backward of slot parity p
        belongs to the batch with that parity."""
        for op, a in zip(self._stream_ops(phase, parity), self.phases[phase][self.rank]):
            if a.kind == "B":
                self._reduce_batch = self.batch - (1 if a.mb < self.m else 0) if phase != "drain" else self.batch
            yield op

    def drain(self) -> None:
        """Finish the backwards still in flight (the last batch's), wait for every send, and
        leave the pipeline empty (the next step starts a 'first' iteration)."""
        if self._restart:
            return
        self._recv.clear()
        self._reduce_batch = self.batch
        for op in self._run_list("drain", (self.batch + 1) % 2):
            op()
        for works in self._prev_sends + self._sends:
            for w in works:
                w.wait()
        self._prev_sends, self._sends[:] = [], []
        if self._recv:
            raise RuntimeError(f"pipeline rank {self.rank}: receives {sorted(self._recv)} were posted but never used")
        for st in self._stage_list:
            st.clear_runtime_states()
        self._restart = True


def make_executor(stages: list, program: Program, rank: int, loss_fn: Optional[Callable],
                  handlers: Optional[dict[str, Callable[[int], None]]] = None, lean_weight_grad: bool = False) -> ScheduleExecutor:
    """An executor over PipelineStages built for `program` (stage ids = their stage_index)."""
    return ScheduleExecutor({st.stage_index: st for st in stages}, program, rank, loss_fn, handlers,
                            lean_weight_grad=lean_weight_grad)


__all__ = ["ScheduleExecutor", "StreamExecutor", "make_executor"]
