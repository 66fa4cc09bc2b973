"""Per-rank action orders of the pipeline schedules.

GPipe and 1F1B are generated here. The multi-stage schedules (interleaved_1f1b,
interleaved_zb, zbv, dualpipev) take the order torch.distributed.pipelining computes
(`pipeline_order`), so the simulator predicts the very order the runtime executes: the
schedule classes are built on lightweight stand-in stages (only group_size, group_rank,
num_stages, stage_index are read when the order is computed; no process group is touched).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace
from typing import Optional

from moepipe.config import ConfigError
from moepipe.placement.plan import stage_assignment

KINDS = ("F", "B", "I", "W", "FB")  # forward, full backward, backward-input, backward-weight, overlapped F+B pair

TORCH_CLASSES = {
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "interleaved_zb": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
V_STYLE = ("zbv", "dualpipev")


@dataclass(frozen=True)
class Action:
    kind: str
    stage: int
    mb: int
    pair: Optional[tuple["Action", "Action"]] = None  # FB only: (forward, full backward) run overlapped

    def __str__(self) -> str:
        if self.pair:
            return f"({self.pair[0]};{self.pair[1]})"
        return f"{self.stage}{self.kind}{self.mb}"


Order = dict[int, list[Action]]


def gpipe_order(pp: int, m: int) -> Order:
    """All forwards, then all backwards in the same microbatch order."""
    return {r: [Action("F", r, i) for i in range(m)] + [Action("B", r, i) for i in range(m)] for r in range(pp)}


def one_f_one_b_order(pp: int, m: int) -> Order:
    """Rank r warms up with min(pp-1-r, m) forwards, then alternates F/B, then drains backwards;
    it keeps at most pp-r microbatches in flight."""
    out: Order = {}
    for r in range(pp):
        warm = min(pp - 1 - r, m)
        acts = [Action("F", r, i) for i in range(warm)]
        f, b = warm, 0
        while f < m:
            acts += [Action("F", r, f), Action("B", r, b)]
            f, b = f + 1, b + 1
        acts += [Action("B", r, i) for i in range(b, m)]
        out[r] = acts
    return out


def _convert(a) -> Action:
    kind = a.computation_type.value
    if kind == "OVERLAP_F_B":
        f, b = (_convert(x) for x in a.sub_actions)
        return Action("FB", f.stage, f.mb, (f, b))
    if kind not in ("F", "B", "I", "W"):
        raise ValueError(f"unexpected action {a} in a compute-only order")
    return Action(kind, int(a.stage_index), int(a.microbatch_index))


@lru_cache(maxsize=64)
def _torch_order_cached(name: str, pp: int, v: int, m: int) -> tuple[tuple[tuple[Action, ...], ...], tuple[int, ...]]:
    from torch.distributed.pipelining import schedules as S

    cls = getattr(S, TORCH_CLASSES[name])
    n = pp * v
    # Stand-ins for PipelineStage: the order computation reads only these attributes.
    stages = [
        SimpleNamespace(group_size=pp, group_rank=0, num_stages=n, stage_index=i, submod=None, is_first=i == 0, is_last=i == n - 1)
        for i in range(v)
    ]
    try:
        sched = cls(stages, m, loss_fn=lambda out, tgt: out)
    except ValueError as exc:  # the schedule's own constraint (microbatch count, stages per rank)
        raise ConfigError(f"schedule.name={name} with pp={pp}, virtual_stages={v}, microbatches={m} is rejected by torch: {exc}") from None
    order = tuple(tuple(_convert(a) for a in sched.pipeline_order[r] if a is not None) for r in range(pp))
    mapping = tuple(int(sched.stage_index_to_group_rank[s]) for s in range(n))
    return order, mapping


def torch_order(name: str, pp: int, v: int, m: int) -> tuple[Order, list[int]]:
    """(order, stage -> pp rank) exactly as torch's schedule class computes them."""
    order, mapping = _torch_order_cached(name, pp, v, m)
    return {r: list(acts) for r, acts in enumerate(order)}, list(mapping)


def schedule_order(name: str, pp: int, virtual_stages: int, m: int) -> tuple[Order, list[int]]:
    """(per-rank action order, pp rank of each stage) for a schedule name of conf/schedule."""
    if name in ("gpipe", "1f1b"):
        if virtual_stages != 1:
            raise ConfigError(f"schedule.virtual_stages={virtual_stages} with schedule.name={name}: single-stage schedules need 1")
        return (gpipe_order if name == "gpipe" else one_f_one_b_order)(pp, m), list(range(pp))
    if name not in TORCH_CLASSES:
        raise ConfigError(f"schedule.name={name!r} is not known: choose one of gpipe, 1f1b, {', '.join(TORCH_CLASSES)}")
    if name in V_STYLE and virtual_stages != 2:
        raise ConfigError(f"schedule.virtual_stages={virtual_stages} with schedule.name={name}: V schedules need exactly 2")
    order, mapping = torch_order(name, pp, virtual_stages, m)
    assert mapping == stage_assignment(pp, virtual_stages, plan_style(name)), "torch changed its stage assignment"
    return order, mapping


def plan_style(name: str) -> str:
    """How a plan for this schedule assigns stages to pipeline ranks."""
    return "v" if name in V_STYLE else "loop"
