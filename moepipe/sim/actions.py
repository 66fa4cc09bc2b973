"""Pipeline schedules as data: the action vocabulary, CSV action tables, the lowering of a
compute-only order to one with sends and receives, and the validation of a table. Pure code
(no torch, no process group): the simulator and the runtime's executor both read a `Program`.

Actions, written as torch.distributed.pipelining writes them (a torch `_dump_csv` file loads):
  <s>F<i>  forward of microbatch i on stage s      <s>B<i>  full backward
  <s>I<i>  backward for the input only             <s>W<i>  backward for the weights (after I)
  (<s>F<i>;<t>B<j>)  an overlapped forward/backward pair, optionally followed by OVERLAP_F_B
  <s>SEND_F<i> / <s+1>RECV_F<i>   the activation of F(s, i) to the next stage's rank
  <s>SEND_B<i> / <s-1>RECV_B<i>   the input gradient of B/I(s, i) to the previous stage's rank
  <s>REDUCE_GRAD  stage s's gradients are complete: all-reduce them over the stage's replicas
  <s>STEP         optimizer step of stage s (inside the step: asynchronous schedules)
A table is a CSV file with one row per pipeline rank (blank cells and `#` lines ignored). A
table without any SEND/RECV is compute-only and is lowered here; one with them is checked as
written. Neighbouring stages on the same rank hand tensors over locally (no send, no receive).

Stages form chains of `chain_len` consecutive ids (one chain = one model replica: a plain
pipeline has one chain of all stages; a bidirectional schedule has two): a microbatch runs
forward through every stage of exactly one chain and backward through the same stages.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

COMPUTE = ("F", "B", "I", "W")
COMMS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
STAGE_OPS = ("REDUCE_GRAD", "STEP")  # per stage, no microbatch
KINDS = COMPUTE + ("FB",) + COMMS + STAGE_OPS


class ScheduleError(ValueError):
    """A malformed schedule; the message is one line."""


@dataclass(frozen=True)
class Action:
    kind: str
    stage: int
    mb: int = -1
    pair: Optional[tuple["Action", "Action"]] = None  # FB only: (forward, full backward) run overlapped

    def __str__(self) -> str:
        if self.pair:
            return f"({self.pair[0]};{self.pair[1]})"
        return f"{self.stage}{self.kind}" + ("" if self.kind in STAGE_OPS else str(self.mb))

    def leaves(self) -> tuple["Action", ...]:
        return self.pair if self.pair else (self,)


Order = dict[int, list[Action]]

_ONE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|REDUCE_GRAD|STEP|F|B|I|W)(\d*)$")


def parse_action(text: str) -> Optional[Action]:
    """One cell of a table; None for a blank cell."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("("):
        inner, _, suffix = text[1:].partition(")")
        subs = [parse_action(p) for p in inner.split(";")]
        if len(subs) != 2 or suffix not in ("", "OVERLAP_F_B") or not all(subs) or [s.kind for s in subs] != ["F", "B"]:
            raise ScheduleError(f"'{text}' is not an overlapped pair: write (<s>F<i>;<t>B<j>)")
        return Action("FB", subs[0].stage, subs[0].mb, (subs[0], subs[1]))
    m = _ONE.match(text)
    if not m or (m.group(2) in STAGE_OPS) != (m.group(3) == ""):
        raise ScheduleError(f"'{text}' is not an action: write <stage><F|B|I|W|SEND_F|RECV_F|SEND_B|RECV_B><microbatch>, "
                            "<stage>REDUCE_GRAD or <stage>STEP")
    return Action(m.group(2), int(m.group(1)), int(m.group(3)) if m.group(3) else -1)


def as_action(item) -> Action:
    """An Action, an action string, or a (kind, stage, microbatch) tuple (a schedule function's output)."""
    if isinstance(item, Action):
        return item
    if isinstance(item, str):
        a = parse_action(item)
        if a is None:
            raise ScheduleError("an empty action string")
        return a
    kind, stage, mb = item
    if str(kind) not in KINDS or str(kind) == "FB":
        raise ScheduleError(f"action kind {kind!r} is not one of {', '.join(k for k in KINDS if k != 'FB')}")
    return Action(str(kind), int(stage), int(mb))


def read_table(path: str) -> Order:
    """Rows of a CSV action table, one per pipeline rank."""
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    except OSError as err:
        raise ScheduleError(f"cannot read the table: {err.strerror}") from None
    out: Order = {}
    for r, row in enumerate(rows):
        acts = []
        for c, cell in enumerate(row):
            try:
                a = parse_action(cell)
            except ScheduleError as err:
                raise ScheduleError(f"rank {r} (row {r + 1}), cell {c + 1}: {err}") from None
            if a is not None:
                acts.append(a)
        out[r] = acts
    return out


def write_table(path: str, order: Order) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([[str(a) for a in order[r]] for r in sorted(order)])


def is_compute(a: Action) -> bool:
    return a.kind in COMPUTE or a.kind == "FB"


def has_comms(order: Order) -> bool:
    return any(a.kind in COMMS for acts in order.values() for a in acts)


@dataclass
class Program:
    """A validated schedule: every rank's full action list (compute, sends/receives, stage
    ops), where each stage runs, and the microbatch count. `compute_order()` is what the
    simulator runs; `actions` is what the executor runs: the same compute order."""

    actions: Order
    stage_to_rank: list[int]
    microbatches: int
    chain_len: int = 0  # stages per chain; 0: one chain of all stages
    backwards: dict[int, int] = field(default_factory=dict)  # stage -> microbatches it runs backward for

    def __post_init__(self) -> None:
        if not self.chain_len:
            self.chain_len = len(self.stage_to_rank)

    @property
    def n_stages(self) -> int:
        return len(self.stage_to_rank)

    def prev(self, s: int) -> Optional[int]:
        return None if s % self.chain_len == 0 else s - 1

    def next(self, s: int) -> Optional[int]:
        return None if (s + 1) % self.chain_len == 0 else s + 1

    def compute_order(self) -> Order:
        return {r: [a for a in acts if is_compute(a)] for r, acts in self.actions.items()}


def _fail(msg: str):
    raise ScheduleError(msg)


def stage_map(order: Order, n_stages: int) -> list[int]:
    """Which rank runs each stage (from where its actions are); every stage on exactly one rank."""
    where: dict[int, int] = {}
    for r in sorted(order):
        for a in order[r]:
            for x in a.leaves():
                if not 0 <= x.stage < n_stages:
                    _fail(f"rank {r} runs {x}: stage {x.stage} is not in 0..{n_stages - 1}")
                if x.kind in COMMS:
                    continue  # a receive names the receiving stage, which lives here too; checked with the comms
                if where.setdefault(x.stage, r) != r:
                    _fail(f"stage {x.stage} runs on rank {where[x.stage]} and on rank {r}: a stage lives on one rank")
    missing = [s for s in range(n_stages) if s not in where]
    if missing:
        _fail(f"stage {missing[0]} runs no action: every stage 0..{n_stages - 1} needs its forwards and backwards")
    return [where[s] for s in range(n_stages)]


def check_coverage(order: Order, n_stages: int, m: int, chain_len: int) -> dict[int, int]:
    """Every microbatch forward through all stages of one chain, each forward matched by one
    backward (B, or I then W) on the same rank, in a valid order. Returns stage -> backwards."""
    state: dict[tuple[int, int], str] = {}  # (stage, mb) -> F, I, done
    for r in sorted(order):
        for a in order[r]:
            for x in a.leaves():
                if x.kind not in COMPUTE:
                    continue
                if not 0 <= x.mb < m:
                    _fail(f"rank {r} runs {x}: microbatch {x.mb} is not in 0..{m - 1}")
                key, st = (x.stage, x.mb), state.get((x.stage, x.mb))
                if x.kind == "F":
                    if st is not None:
                        _fail(f"rank {r} runs {x} twice: each stage runs each microbatch's forward once")
                    state[key] = "F"
                elif st is None:
                    _fail(f"rank {r} runs {x} before {x.stage}F{x.mb}: a backward follows its forward")
                elif x.kind in ("B", "I"):
                    if st != "F":
                        _fail(f"rank {r} runs {x} but stage {x.stage} already ran microbatch {x.mb}'s backward")
                    state[key] = "done" if x.kind == "B" else "I"
                elif st != "I":
                    _fail(f"rank {r} runs {x} without {x.stage}I{x.mb} before it: W follows I")
                else:
                    state[key] = "done"
    backwards: dict[int, int] = {}
    for (s, i), st in sorted(state.items()):
        if st == "F":
            _fail(f"stage {s} never runs the backward of microbatch {i}: add {s}B{i} (or {s}I{i} and {s}W{i})")
        if st == "I":
            _fail(f"stage {s} runs {s}I{i} but never {s}W{i}: its weight gradient would be lost")
        backwards[s] = backwards.get(s, 0) + 1
    chains = n_stages // chain_len
    by_mb: dict[int, list[int]] = {}
    for s, i in state:
        by_mb.setdefault(i, []).append(s)
    for i in range(m):
        on = sorted(by_mb.get(i, ()))
        if not on:
            _fail(f"microbatch {i} runs on no stage: every microbatch 0..{m - 1} needs a forward on each stage of its chain")
        c = on[0] // chain_len
        want = list(range(c * chain_len, (c + 1) * chain_len))
        if on != want:
            gap = sorted(set(want) - set(on)) or sorted(set(on) - set(want))
            what = "never runs" if set(want) - set(on) else "also runs"
            _fail(f"stage {gap[0]} {what} the forward of microbatch {i}: a microbatch passes through every stage of "
                  f"its chain ({want[0]}..{want[-1]}){'' if chains == 1 else ' and no other'}")
    return backwards


def _needs(prog: Program, x: Action) -> Optional[tuple[str, int, int]]:
    """The compute action on a neighbouring stage whose output x consumes: (kind family, stage, mb)."""
    if x.kind == "F":
        p = prog.prev(x.stage)
        return None if p is None else ("F", p, x.mb)
    if x.kind in ("B", "I"):
        n = prog.next(x.stage)
        return None if n is None else ("G", n, x.mb)  # G: B or I of the next stage
    return None


def _family(x: Action) -> str:
    return "F" if x.kind == "F" else "G" if x.kind in ("B", "I") else x.kind


def lower(prog: Program, order: Order) -> Order:
    """Add sends and receives to a compute-only order. Ranks advance in turn while their next
    action's inputs exist; a send and its receive are appended together, so each pair of ranks
    posts its receives in the order the sends are posted (point-to-point messages between two
    ranks are matched in posting order). No rank able to advance: a deadlock (one line)."""
    s2r = prog.stage_to_rank
    out: Order = {r: [] for r in order}
    produced: set[tuple[str, int, int]] = set()

    def ready(r: int, a: Action) -> bool:
        return all(n is None or n in produced for n in (_needs(prog, x) for x in a.leaves()))

    def run(r: int, a: Action) -> None:
        out[r].append(a)
        for x in a.leaves():
            fam = _family(x)
            produced.add((fam, x.stage, x.mb))
            nb = prog.next(x.stage) if fam == "F" else prog.prev(x.stage) if fam == "G" else None
            if nb is not None and s2r[nb] != r:
                kind = "F" if fam == "F" else "B"
                out[r].append(Action(f"SEND_{kind}", x.stage, x.mb))
                out[s2r[nb]].append(Action(f"RECV_{kind}", nb, x.mb))

    _run_in_turn(order, ready, run)
    return out


def _run_in_turn(order: Order, ready: Callable[[int, Action], bool], run: Callable[[int, Action], None]) -> None:
    """Ranks in turn run their next actions while `ready` says so; none able to: a deadlock."""
    ptr = {r: 0 for r in order}
    left = sum(len(v) for v in order.values())
    while left:
        progress = False
        for r in sorted(order):
            acts = order[r]
            while ptr[r] < len(acts) and ready(r, acts[ptr[r]]):
                run(r, acts[ptr[r]])
                ptr[r] += 1
                left -= 1
                progress = True
        if not progress:
            _deadlock(order, ptr)


def _deadlock(order: Order, ptr: dict[int, int]):
    stuck = ", ".join(f"rank {r} at {order[r][ptr[r]]}" for r in sorted(order) if ptr[r] < len(order[r]))
    _fail(f"the order deadlocks (simulated: no rank can run its next action): {stuck}")


def check_comms(prog: Program, order: Order) -> None:
    """A table written with its sends and receives: every receive has its send and vice versa,
    each pair of ranks receives in the order it sends, nothing is sent or consumed before it
    exists, and running it (sends never block, a consumer waits for the send) cannot deadlock."""
    s2r = prog.stage_to_rank
    sends: dict[tuple[int, int], list[tuple]] = {}
    recvs: dict[tuple[int, int], list[tuple]] = {}
    for r in sorted(order):
        seen: set[tuple[str, int, int]] = set()
        posted: set[tuple[str, int, int]] = set()
        for a in order[r]:
            if a.kind in COMMS:
                d = a.kind[-1]  # F or B
                if a.kind.startswith("SEND"):
                    nb = prog.next(a.stage) if d == "F" else prog.prev(a.stage)
                    if s2r[a.stage] != r:
                        _fail(f"rank {r} runs {a} but stage {a.stage} is on rank {s2r[a.stage]}")
                    if nb is None:
                        _fail(f"rank {r} runs {a}: stage {a.stage} has no {'next' if d == 'F' else 'previous'} stage to send to")
                    if s2r[nb] == r:
                        _fail(f"rank {r} runs {a}: stages {a.stage} and {nb} are both on rank {r} and hand over locally; drop it")
                    if ("F" if d == "F" else "G", a.stage, a.mb) not in seen:
                        _fail(f"rank {r} runs {a} before the {'forward' if d == 'F' else 'backward'} that produces it")
                    sends.setdefault((r, s2r[nb]), []).append((d, nb, a.mb, str(a)))
                else:
                    src = prog.prev(a.stage) if d == "F" else prog.next(a.stage)
                    if s2r[a.stage] != r or src is None or s2r[src] == r:
                        _fail(f"rank {r} runs {a}, which receives from no other rank: stage {a.stage} is on rank {s2r[a.stage]}"
                              + ("" if src is None else f", its {'previous' if d == 'F' else 'next'} stage {src} on rank {s2r[src]}"))
                    recvs.setdefault((s2r[src], r), []).append((d, a.stage, a.mb, str(a)))
                    posted.add((d, a.stage, a.mb))
                continue
            for x in a.leaves():
                need = _needs(prog, x)
                if need is not None and s2r[need[1]] != r and ("F" if x.kind == "F" else "B", x.stage, x.mb) not in posted:
                    d = "F" if x.kind == "F" else "B"
                    _fail(f"rank {r} runs {x} without receiving its input first: add {x.stage}RECV_{d}{x.mb} before it "
                          f"(and {need[1]}SEND_{d}{x.mb} on rank {s2r[need[1]]})")
                seen.add((_family(x), x.stage, x.mb))
    for pair in sorted(set(sends) | set(recvs)):
        s, q = sends.get(pair, []), recvs.get(pair, [])
        for k in range(max(len(s), len(q))):
            if k >= len(s):
                d, st, i, txt = q[k]
                src = prog.prev(st) if d == "F" else prog.next(st)
                _fail(f"rank {pair[1]} receives {txt} but rank {pair[0]} never sends it: add {src}SEND_{d}{i} after {src}{'F' if d == 'F' else 'B'}{i}")
            if k >= len(q):
                d, st, i, txt = s[k]
                _fail(f"rank {pair[0]} sends {txt} but rank {pair[1]} never receives it: add {st}RECV_{d}{i} before its use")
            if s[k][:3] != q[k][:3]:
                _fail(f"rank {pair[0]} sends {s[k][3]} as message {k + 1} to rank {pair[1]}, which receives {q[k][3]} there: "
                      "messages between two ranks match in order; receive in the order sent")
    # Run it: a consumer waits for the matching send; sends and receive postings never block.
    sent: set[tuple[str, int, int]] = set()

    def ready(r: int, a: Action) -> bool:
        return a.kind in COMMS or not any(
            (n := _needs(prog, x)) is not None and s2r[n[1]] != r and ("F" if x.kind == "F" else "B", n[1], x.mb) not in sent
            for x in a.leaves())

    def run(r: int, a: Action) -> None:
        if a.kind.startswith("SEND"):
            sent.add((a.kind[-1], a.stage, a.mb))

    _run_in_turn(order, ready, run)


def build_program(lists: Order, pp: int, n_stages: int, m: int, chain_len: int = 0,
                  stage_to_rank: Optional[list[int]] = None) -> Program:
    """Validate per-rank action lists (compute-only, or with sends/receives) and return the
    Program with communication: ScheduleError (one line) on the first problem found."""
    if sorted(lists) != list(range(pp)):
        _fail(f"the schedule has rows for ranks {sorted(lists)}, expected one per pipeline rank 0..{pp - 1}")
    chain_len = chain_len or n_stages
    if n_stages % chain_len:
        _fail(f"{n_stages} stages do not split into chains of {chain_len}")
    found = stage_map(lists, n_stages)
    if stage_to_rank is not None and list(stage_to_rank) != found:
        _fail(f"the schedule puts stages on ranks {found}, but the plan places them on {list(stage_to_rank)}")
    prog = Program({}, found, m, chain_len)
    prog.backwards = check_coverage(lists, n_stages, m, chain_len)
    if has_comms(lists):
        check_comms(prog, lists)
        prog.actions = {r: list(v) for r, v in lists.items()}
    else:
        prog.actions = lower(prog, lists)
    return prog


def kinds_used(order: Order) -> set[str]:
    return {x.kind for acts in order.values() for a in acts for x in a.leaves()}


def flatten(order: Order) -> Iterable[tuple[int, Action]]:
    for r in sorted(order):
        for a in order[r]:
            yield r, a
