"""The names moepipe itself registers, per kind, as import paths ("module:attr").

Plain strings, imported only when a name is used, so reading this table (config validation,
error messages) imports neither torch nor a backend library. Nothing from moepipe is imported
here: moepipe.config derives its tuples of built-in names from this table.
"""
from __future__ import annotations

from typing import NamedTuple


class ScheduleSpec(NamedTuple):
    """A pipeline schedule: the torch.distributed.pipelining class (an import path), how a plan
    places its stages on pipeline ranks ("loop": s % pp, "v": down then back up), whether a
    rank runs several stages (schedule.virtual_stages > 1), and optionally the order the class
    executes, for the simulator and placers (a function or import path: `(pp, virtual_stages,
    microbatches) -> per pp rank a list of (kind, stage, microbatch)`, kind F/B/I/W, or of
    action strings such as "0F1", "0SEND_F1": moepipe/sim/actions.py); needed only for a
    single-stage class, since torch reports no order for those; without it the order is
    torch's `pipeline_order` (multi-stage classes) or generated (GPipe, 1F1B). A spec whose
    torch_class is None is a schedule only moepipe's executor runs (schedule.executor=moepipe):
    its `order` is the schedule."""

    torch_class: object = None
    style: str = "loop"
    multi_stage: bool = False
    order: object = None


_PIPELINING = "torch.distributed.pipelining"

BUILTINS: dict[str, dict[str, object]] = {
    "placer": {
        "static": "moepipe.placement.placers:static_placer",
        "balance_by_time": "moepipe.placement.placers:balance_by_time_placer",
        "eplb": "moepipe.placement.placers:eplb_placer",
        "topo": "moepipe.placement.placers:topo_placer",
    },
    "forecaster": {
        "ema": "moepipe.placement.forecast:ema",
        "last": "moepipe.placement.forecast:last",
        "window": "moepipe.placement.forecast:window",
        "trend": "moepipe.placement.forecast:trend",
        "periodic": "moepipe.placement.forecast:periodic",
    },
    "workload": {
        kind: f"moepipe.placement.workloads:{kind}"
        for kind in ("none", "zipf", "hot_expert", "hot_rank", "rotating", "burst", "lognormal", "local_hot")
    },
    "schedule": {
        "gpipe": ScheduleSpec(f"{_PIPELINING}:ScheduleGPipe"),
        "1f1b": ScheduleSpec(f"{_PIPELINING}:Schedule1F1B"),
        "interleaved_1f1b": ScheduleSpec(f"{_PIPELINING}:ScheduleInterleaved1F1B", "loop", True),
        "interleaved_zb": ScheduleSpec(f"{_PIPELINING}:ScheduleInterleavedZeroBubble", "loop", True),
        "zbv": ScheduleSpec(f"{_PIPELINING}:ScheduleZBVZeroBubble", "v", True),
        "dualpipev": ScheduleSpec(f"{_PIPELINING}:ScheduleDualPipeV", "v", True),
        # runs on moepipe's executor only: two weight versions, gradients applied one step late
        "pipedream_2bw": ScheduleSpec(None, "loop", False, "moepipe.sim.schedules:pipedream_2bw_order"),
        "chimera": ScheduleSpec(None, "loop", False, "moepipe.sim.schedules:chimera_order"),
    },
    "moe_backend": {
        "native": "moepipe.model.backends:native",
        "fairscale": "moepipe.model.backends:fairscale",
        "tutel": "moepipe.model.backends:tutel",
    },
}

KINDS = tuple(BUILTINS)


def builtin_names(kind: str) -> tuple[str, ...]:
    return tuple(BUILTINS[kind])
