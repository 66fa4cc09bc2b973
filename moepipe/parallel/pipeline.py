"""Pipeline schedules from torch.distributed.pipelining, built over plan-driven stages."""
from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

SINGLE_STAGE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI_STAGE = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}


def build_schedule(
    name: str,
    modules: dict[int, torch.nn.Module],
    n_stages: int,
    microbatches: int,
    loss_fn: Callable,
    device: torch.device,
    pp_group,
):
    """`modules`: stage index -> module for the stages this rank holds (plan order).

    Gradients are not rescaled by the schedule (scale_grads=False): the loss function already
    divides by the microbatch count, as the single-process reference does, so both perform
    the same arithmetic.
    """
    stages = [PipelineStage(m, idx, n_stages, device, group=pp_group) for idx, m in sorted(modules.items())]
    if name in SINGLE_STAGE:
        if len(stages) != 1:
            raise ValueError(f"schedule.name={name} runs one stage per rank, got {len(stages)}: use an interleaved schedule")
        return SINGLE_STAGE[name](stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
    return MULTI_STAGE[name](stages, microbatches, loss_fn=loss_fn, scale_grads=False)
