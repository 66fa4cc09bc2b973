"""Per-rank action orders of the pipeline schedules.

A schedule name is looked up in the plug-in registry (a moepipe.plugins.ScheduleSpec), so a
user's schedule is simulated and placed like a built-in. GPipe and 1F1B are generated here.
Schedules whose torch class computes a `pipeline_order` (the multi-stage ones: interleaved_1f1b,
interleaved_zb, zbv, dualpipev, and a user's subclass of torch's PipelineScheduleMulti) take the
order torch computes, so the simulator predicts the very order the runtime executes: the
schedule classes are built on lightweight stand-in stages (only group_size, group_rank,
num_stages, stage_index are read when the order is computed; no process group is touched).
A spec may instead name its own order function (`ScheduleSpec.order`), and a schedule may be a
CSV action table, `schedule.name=file:<path>` (moepipe/sim/actions.py has the format).

One source for the simulator and the runtime: `schedule_program` validates the order and adds
its sends and receives (a `Program`); the simulator runs `Program.compute_order()` and moepipe's
executor (parallel/executor.py) runs `Program.actions`, the same compute order.
"""
from __future__ import annotations

import os
from functools import lru_cache
from types import SimpleNamespace

from moepipe.config import ConfigError
from moepipe.placement.plan import STYLES, stage_assignment
from moepipe.plugins.builtins import ScheduleSpec
from moepipe.plugins.registry import import_path, resolve
from moepipe.sim.actions import COMMS, STAGE_OPS, Action, Order, Program, ScheduleError, as_action, build_program, read_table  # noqa: F401 (Action, Order: re-exported)

KINDS = ("F", "B", "I", "W", "FB")  # forward, full backward, backward-input, backward-weight, overlapped F+B pair

# torch's single-stage classes compute no pipeline_order: their orders are generated here
_GPIPE, _1F1B = "torch.distributed.pipelining:ScheduleGPipe", "torch.distributed.pipelining:Schedule1F1B"


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


def pipedream_2bw_order(pp: int, v: int, m: int) -> Order:
    """PipeDream-2BW (Narayanan et al., 2021) per iteration: the 1F1B order, run with two weight
    versions and the gradient applied one step late (moepipe.train.optim.WeightStash). The
    function's attributes tell the simulator and the trainers what the order alone does not:
    `weight_versions` (2: a stage holds W(t) and the stashed W(t-1)) and `flush` (False: the
    steady 1F1B state carries across iterations; the simulator reports the steady iteration
    of this order unrolled, and the distributed runtime runs the same stream cut per step,
    `two_bw_stream`, on parallel/executor.StreamExecutor)."""
    if v != 1:
        raise ConfigError(f"schedule.virtual_stages={v} with schedule.name=pipedream_2bw: it runs one stage per rank; set 1")
    return one_f_one_b_order(pp, m)


pipedream_2bw_order.weight_versions = 2
pipedream_2bw_order.flush = False



def chimera_order(pp: int, v: int, m: int) -> Order:
    """Chimera (Li and Hoefler, SC'21): two replicas of the model as two pipelines in opposite
    directions. Stages 0..pp-1 are the down chain (stage i on rank i) and pp..2pp-1 the up
    chain (stage pp+j holds the layers of stage j, on rank pp-1-j): each rank holds stage i of
    one replica and stage pp-1-i of the other. Microbatches 0..m/2-1 run down, m/2..m-1 up.

    The order is list-scheduled with unit forward and backward times: whenever a rank is
    free it runs, of its actions whose inputs are there, the one that can start first, a
    backward before a forward, and a forward deeper in its chain first; a stage at position
    k of its chain holds at most pp-k microbatches (1F1B's bound). With equal forward and
    backward times this gives the paper's bubble (pp-2)/(2m+pp-2) at m = pp and its
    multiples, and activations of pp/2+1..pp microbatches per rank at m = pp (pp at m >= 2pp).
    Attribute `chains = 2`: every plan stage has a second replica (moepipe.placement.plan)."""
    if v != 1:
        raise ConfigError(f"schedule.virtual_stages={v} with schedule.name=chimera: each rank holds one stage of each of the two "
                          "pipelines; set 1")
    if pp % 2 or m % 2:
        raise ConfigError(f"schedule.name=chimera needs an even parallel.pp and an even schedule.microbatches (half run each "
                          f"way), got pp={pp}, microbatches={m}")
    L, S = pp, 2 * pp
    s2r = list(range(pp)) + list(range(pp - 1, -1, -1))
    mbs = [list(range(m // 2)), list(range(m // 2, m))]
    fdone: dict[tuple[int, int], float] = {}
    bdone: dict[tuple[int, int], float] = {}
    nf, nb, held = [0] * S, [0] * S, [0] * S
    free, out = [0.0] * pp, {r: [] for r in range(pp)}
    for _ in range(2 * S * (m // 2)):
        best = None
        for s in range(S):
            r, k, mine = s2r[s], s % L, mbs[s // L]
            if nb[s] < len(mine) and (s, mine[nb[s]]) in fdone:
                i = mine[nb[s]]
                t = fdone[(s, i)] if k == L - 1 else bdone.get((s + 1, i))
                if t is not None:
                    key = (max(free[r], t), 0, k, s)
                    best = min(best, (key, "B", s, i)) if best else (key, "B", s, i)
            if nf[s] < len(mine) and held[s] < L - k:
                i = mine[nf[s]]
                t = 0.0 if k == 0 else fdone.get((s - 1, i))
                if t is not None:
                    key = (max(free[r], t), 1, -k, s)
                    best = min(best, (key, "F", s, i)) if best else (key, "F", s, i)
        (start, *_), kind, s, i = best
        r = s2r[s]
        free[r] = start + 1.0
        out[r].append(Action(kind, s, i))
        if kind == "F":
            fdone[(s, i)], nf[s], held[s] = free[r], nf[s] + 1, held[s] + 1
        else:
            bdone[(s, i)], nb[s], held[s] = free[r], nb[s] + 1, held[s] - 1
            if nb[s] == len(mbs[s // L]):  # this replica's gradient is complete: all-reduce it with the other's
                out[r].append(Action("REDUCE_GRAD", s))
    return out


chimera_order.chains = 2


def schedule_chains(name: str) -> int:
    """Model replicas a schedule runs as separate pipelines (its order function's `chains`
    attribute; 2 for chimera): each plan stage then also runs, as stage n + s, on pp rank
    pp-1-r of its rank r (moepipe.placement.plan.stage_pp_ranks)."""
    if is_table(name):
        return 1
    fn = resolve("schedule", name).order
    if fn is None:
        return 1
    fn = import_path(fn) if isinstance(fn, str) else fn
    return int(getattr(fn, "chains", 1))


def two_bw_stream(pp: int, m: int) -> dict[str, dict[int, list[Action]]]:
    """PipeDream-2BW without a flush: per pp rank the action lists the executor runs each step.
    1F1B's stream over all iterations is cut at the first forward of every batch, so iteration
    t holds batch t's m forwards and the m backwards m - w earlier (w = pp - 1 - r warm-up
    forwards on rank r): the last w backwards of batch t-1, then the first m - w of batch t.
    Microbatch ids are relative: 0..m-1 the previous batch, m..2m-1 this step's batch.
    'first': an iteration after a drained pipeline (no previous batch); 'steady'; 'drain':
    the w backwards left after the last step (its batch numbered 0..m-1). REDUCE_GRAD follows
    a stage's last backward of a batch (that batch's gradient is complete there). Sends follow
    their producer, receives precede their consumer: one stage per rank, so each direction
    between two ranks carries one kind of message in microbatch order."""
    def lowered(r: int, compute: list[Action]) -> list[Action]:
        out: list[Action] = []
        for a in compute:
            if a.kind == "F" and r > 0:
                out.append(Action("RECV_F", r, a.mb))
            if a.kind == "B" and r < pp - 1:
                out.append(Action("RECV_B", r, a.mb))
            out.append(a)
            if a.kind == "F" and r < pp - 1:
                out.append(Action("SEND_F", r, a.mb))
            if a.kind == "B":
                if r > 0:
                    out.append(Action("SEND_B", r, a.mb))
                if a.mb % m == m - 1:
                    out.append(Action("REDUCE_GRAD", r))
        return out

    phases: dict[str, dict[int, list[Action]]] = {"first": {}, "steady": {}, "drain": {}}
    for r in range(pp):
        w = min(pp - 1 - r, m)
        first, steady = [], []
        for i in range(m):
            first.append(Action("F", r, m + i))
            steady.append(Action("F", r, m + i))
            if i >= w:
                first.append(Action("B", r, m + i - w))
            steady.append(Action("B", r, m + i - w))
        phases["first"][r] = lowered(r, first)
        phases["steady"][r] = lowered(r, steady)
        phases["drain"][r] = lowered(r, [Action("B", r, i) for i in range(m - w, m)])
    return phases

def order_traits(name: str) -> tuple[int, bool]:
    """(weight versions a stage holds, whether the pipeline drains between iterations) that a
    schedule's order function declares (attributes `weight_versions`, `flush`); (1, True) else."""
    if is_table(name):
        return 1, True
    fn = resolve("schedule", name).order
    if fn is None:
        return 1, True
    fn = import_path(fn) if isinstance(fn, str) else fn
    return int(getattr(fn, "weight_versions", 1)), bool(getattr(fn, "flush", True))


UNROLL = 3  # iterations run back to back to measure a no-flush schedule's steady iteration


def steady_iteration(name: str, pp: int, v: int, m: int, makespan) -> float:
    """Per-iteration time of a schedule whose pipeline never drains (`flush = False`): its
    order over UNROLL * m microbatches is UNROLL iterations back to back, so the difference
    to one iteration, over UNROLL - 1, is the steady state (for 1F1B: m * (F + B) on the
    bottleneck stage instead of (m + pp - 1) * (F + B)). `makespan(order, stage_to_rank, m)`
    runs the engine with the caller's costs."""
    one = makespan(*schedule_order(name, pp, v, m), m)
    many = makespan(*schedule_order(name, pp, v, UNROLL * m), UNROLL * m)
    return (many - one) / (UNROLL - 1)


def _convert(a) -> Action:
    kind = a.computation_type.value
    if kind == "OVERLAP_F_B":
        f, b = (_convert(x) for x in a.sub_actions)
        return Action("FB", f.stage, f.mb, (f, b))
    if kind not in ("F", "B", "I", "W"):
        raise ValueError(f"unexpected action {a} in a compute-only order")
    return Action(kind, int(a.stage_index), int(a.microbatch_index))


def _torch_class(spec: ScheduleSpec):
    return import_path(spec.torch_class) if isinstance(spec.torch_class, str) else spec.torch_class


@lru_cache(maxsize=64)
def _torch_order_cached(name: str, cls, pp: int, v: int, m: int) -> tuple[tuple[tuple[Action, ...], ...], tuple[int, ...]]:
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
    """(order, stage -> pp rank) exactly as the schedule's torch class computes them."""
    order, mapping = _torch_order_cached(name, _torch_class(resolve("schedule", name)), pp, v, m)
    return {r: list(acts) for r, acts in enumerate(order)}, list(mapping)


def _own_order(name: str, spec: ScheduleSpec, pp: int, v: int, m: int) -> tuple[Order, list[int]]:
    """A spec's `order` function: (pp, virtual_stages, microbatches) -> per pp rank, a list of
    actions: (kind, stage, microbatch) tuples with kind F, B, I, W, or action strings ("0F1",
    "0SEND_F1", ...: see moepipe/sim/actions.py), or Actions."""
    fn = import_path(spec.order) if isinstance(spec.order, str) else spec.order
    lists = fn(pp, v, m)
    known = {"F", "B", "I", "W", *COMMS, *STAGE_OPS}
    try:
        bad = sorted({str(item[0]) for r in range(pp) for item in lists[r] if isinstance(item, tuple)} - known)
        if bad:
            raise ConfigError(f"schedule.name={name}: its order uses action kinds {bad}; use F, B, I, W")
        order = {r: [as_action(item) for item in lists[r]] for r in range(pp)}
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise ConfigError(f"schedule.name={name}: its order function must return, per pp rank 0..{pp - 1}, a list of "
                          f"(kind, stage, microbatch): {type(err).__name__}: {err}") from None
    if getattr(fn, "chains", 1) == 2:  # the mirrored replica: down the ranks, then back up
        return order, stage_assignment(pp, 2 * v, "v")
    return order, stage_assignment(pp, v, spec.style)


def _spec_order(name: str, pp: int, virtual_stages: int, m: int) -> tuple[Order, list[int]]:
    """The order a registry schedule defines (with or without sends and receives) and its stage placement."""
    spec = resolve("schedule", name)
    if spec.order is not None:
        return _own_order(name, spec, pp, virtual_stages, m)
    if spec.torch_class in (_GPIPE, _1F1B):
        if virtual_stages != 1:
            raise ConfigError(f"schedule.virtual_stages={virtual_stages} with schedule.name={name}: single-stage schedules need 1")
        return (gpipe_order if spec.torch_class == _GPIPE else one_f_one_b_order)(pp, m), list(range(pp))
    if spec.style == "v" and virtual_stages != 2:
        raise ConfigError(f"schedule.virtual_stages={virtual_stages} with schedule.name={name}: V schedules need exactly 2")
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti

    if spec.torch_class is None or not issubclass(_torch_class(spec), PipelineScheduleMulti):
        raise ConfigError(f"schedule.name={name}: the simulator cannot derive the order of single-stage class {spec.torch_class}: "
                          "give its ScheduleSpec an `order` function (pp, virtual_stages, microbatches) -> per-rank actions")
    order, mapping = torch_order(name, pp, virtual_stages, m)
    if mapping != stage_assignment(pp, virtual_stages, spec.style):
        raise ConfigError(f"schedule.name={name}: its torch class puts stages on ranks {mapping}, not as style={spec.style!r} "
                          f"says ({stage_assignment(pp, virtual_stages, spec.style)}): fix the ScheduleSpec's style")
    return order, mapping


TABLE = "file:"  # schedule.name=file:<path>: a CSV action table


def is_table(name: str) -> bool:
    return name.startswith(TABLE)


@lru_cache(maxsize=16)
def _table_cached(path: str, mtime_ns: int) -> Order:
    return read_table(path)


def table_order(name: str) -> Order:
    """The rows of a `file:<path>` schedule (one line on an unreadable or malformed table)."""
    path = os.path.expanduser(name[len(TABLE):])
    try:
        return _table_cached(path, os.stat(path).st_mtime_ns)
    except OSError as err:
        raise ConfigError(f"schedule.name={name}: cannot read the table ({err.strerror}): give the path of a CSV action table") from None
    except ScheduleError as err:
        raise ConfigError(f"schedule.name={name}: {err}") from None


def _table_style(name: str, order: Order) -> str:
    """loop or V, from where the table runs its stages."""
    pp = len(order)
    n = 1 + max((a.stage for acts in order.values() for a in acts), default=0)
    if pp == 0 or n % pp:
        raise ConfigError(f"schedule.name={name}: the table has {pp} rows and {n} stages: it needs one row per pipeline rank "
                          "and the same number of stages on each")
    try:
        from moepipe.sim.actions import stage_map

        found = stage_map(order, n)
    except ScheduleError as err:
        raise ConfigError(f"schedule.name={name}: {err}") from None
    for style in STYLES:
        if found == stage_assignment(pp, n // pp, style):
            return style
    raise ConfigError(f"schedule.name={name}: the table puts stages on ranks {found}, which is neither the loop "
                      f"({stage_assignment(pp, n // pp, 'loop')}) nor the V placement: reorder its stages")


@lru_cache(maxsize=64)
def _program_cached(name: str, key, pp: int, v: int, m: int) -> Program:
    if is_table(name):
        lists = table_order(name)
        n = 1 + max((a.stage for acts in lists.values() for a in acts), default=0)
        if len(lists) != pp or n != pp * v:
            raise ConfigError(f"schedule.name={name}: the table has {len(lists)} rows and {n} stages, but parallel.pp={pp} and "
                              f"schedule.virtual_stages={v} make {pp} ranks and {pp * v} stages: write the table for this mesh")
        mapping = stage_assignment(pp, v, _table_style(name, lists))
    else:
        lists, mapping = _spec_order(name, pp, v, m)
    chains = 1 if is_table(name) else schedule_chains(name)
    try:
        return build_program(lists, pp, chains * pp * v, m, chain_len=pp * v, stage_to_rank=mapping)
    except ScheduleError as err:
        raise ConfigError(f"schedule.name={name}: {err}") from None


def schedule_program(name: str, pp: int, virtual_stages: int, m: int) -> Program:
    """The validated schedule with its sends and receives: what moepipe's executor runs (and,
    through `compute_order()`, what the simulator runs). Treat it as read-only (cached)."""
    if is_table(name):
        path = os.path.expanduser(name[len(TABLE):])
        try:
            key = os.stat(path).st_mtime_ns
        except OSError:
            table_order(name)  # raises its one-line error
    else:
        key = resolve("schedule", name)  # the spec itself: a name registered anew is another schedule
        try:
            hash(key)
        except TypeError:
            key = id(key)
    return _program_cached(name, key, pp, virtual_stages, m)


def schedule_order(name: str, pp: int, virtual_stages: int, m: int) -> tuple[Order, list[int]]:
    """(per-rank compute order, pp rank of each stage) for a schedule name: conf/schedule, a
    registered plug-in, an import path to a ScheduleSpec, or file:<path> (a CSV action table)."""
    prog = schedule_program(name, pp, virtual_stages, m)
    return prog.compute_order(), list(prog.stage_to_rank)


def plan_style(name: str) -> str:
    """How a plan for this schedule assigns stages to pipeline ranks (its ScheduleSpec's style,
    or where a table runs its stages)."""
    if is_table(name):
        return _table_style(name, table_order(name))
    return resolve("schedule", name).style
