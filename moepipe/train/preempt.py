"""SIGTERM ends a run cleanly: the current step finishes, every rank agrees to stop at the same
step, a checkpoint is written, and the process exits with EXIT_PREEMPTED (not 0: the run is not
complete, and no summary.json claims it is). Rerunning the same command resumes
(train.resume=auto)."""
from __future__ import annotations

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 3


class Preempted(Exception):
    """Raised out of the loop after the stop checkpoint is written."""

    def __init__(self, step: int, path: str):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {path}: rerun the same command to resume (train.resume=auto)")
        self.step, self.path = step, path


class StopOnSignal:
    """Context manager: while active, SIGTERM only sets a flag (main thread only: Python runs
    signal handlers there; elsewhere SIGTERM keeps its previous meaning)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            print(f"moepipe: SIGTERM received (pid {os.getpid()}): stopping after this step with a checkpoint", file=sys.stderr, flush=True)
        self.requested = True

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def agreed(self, trainer) -> bool:
        """True on every rank when any rank was signalled (one scalar all-reduce per step: the
        signal may reach some ranks only, or reach them during different steps)."""
        if getattr(trainer, "mesh", None) is None or not dist.is_initialized():
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=trainer.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def inject_sigterm(rank: int, step: int) -> None:
    """Test hook: MOEPIPE_INJECT_SIGTERM="<rank>:<step>" sends that rank SIGTERM as it starts step."""
    spec = os.environ.get("MOEPIPE_INJECT_SIGTERM")
    if spec:
        want_rank, want_step = (int(x) for x in spec.split(":"))
        if want_rank == rank and want_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
