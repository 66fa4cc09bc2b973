"""moepipe's schedule executor (parallel/executor.py) and schedules as data (sim/actions.py).

Parity: torch's own orders (1F1B, interleaved 1F1B, ZBV) run through our executor give the
same per-step losses and parameters as torch's schedule classes, bit for bit on CPU (fp32,
one thread; pp2, and pp2 x ep2 with the expert all-to-alls inside stages): the executor calls
the same PipelineStage compute in the same per-rank order,
so every floating-point sum is formed identically; only the message posting differs.
The orders with split backwards (zbv, interleaved_zb, dualpipev) run with lean W in ours (parallel/weight_grad.py:
I is a full backward with the Linear weights detached, W forms dW = dy^T x from the kept input
and output gradient) and are still bitwise equal: each weight gradient is the same mm as
autograd's (x^T dy, transposed), added to .grad in the same microbatch order.
A hand-written CSV 1F1B table runs end to end through `moepipe-train` and matches torch's
1F1B. Malformed tables fail with one line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moepipe.config import ConfigError
from moepipe.sim.actions import Action, ScheduleError, build_program, parse_action, read_table, write_table
from moepipe.sim.schedules import schedule_order, schedule_program

from conftest import compose_cfg
from dist_utils import gather_state, run_distributed, save

STEPS = 2
TINY = ["model.d_model=16", "model.n_heads=2", "model.ffn_hidden=32", "model.n_layers=4", "model.max_seq_len=8",
        "moe.num_experts=4", "moe.expert_hidden=16", "moe.top_k=2", "moe.capacity_factor=0", "moe.aux_loss_coef=0",
        "moe.z_loss_coef=0.01", "train.batch_size=8", "train.seq_len=8", f"train.steps={STEPS}", "train.dtype=fp32",
        "data.max_bytes=100000", "optim.warmup_steps=1", "optim.lr=3e-3", "optim.grad_clip=0.05"]
ORDERS = [("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2), ("interleaved_zb", 2), ("dualpipev", 2), ("gpipe", 1)]


def _cfg(schedule: str, v: int, executor: str, ep: int = 1):
    return compose_cfg(TINY + [f"schedule.name={schedule}", f"schedule.virtual_stages={v}", "schedule.microbatches=4",
                               f"schedule.executor={executor}", "parallel.pp=2", f"parallel.ep={ep}", "parallel.dp=1"])


def _worker(rank: int, world: int, out_dir: str, orders=ORDERS, ep: int = 1) -> None:
    from moepipe.parallel.mesh import build_mesh
    from moepipe.train.distributed import DistributedTrainer

    mesh = build_mesh(2, ep, 1)
    for schedule, v in orders:
        for executor in ("torch", "moepipe"):
            trainer = DistributedTrainer(_cfg(schedule, v, executor, ep), mesh, None)
            losses = [trainer.train_step(s).loss for s in range(STEPS)]
            state = gather_state(list(trainer.modules.values()), rank)
            if rank == 0:
                lean = sorted(getattr(trainer.schedule, "lean", {}))  # stages running lean W (weight_grad.py)
                save({"losses": losses, "state": state, "type": type(trainer.schedule).__name__, "lean": lean},
                     os.path.join(out_dir, f"{schedule}.{executor}.pt"))


def _assert_bitwise(tmp_path, orders) -> None:
    for schedule, _ in orders:
        ref, ours = (torch.load(tmp_path / f"{schedule}.{e}.pt") for e in ("torch", "moepipe"))
        assert ours["type"] == "ScheduleExecutor" and ref["type"] != "ScheduleExecutor"
        # split-backward orders run lean W on every stage of ours (default schedule.lean_weight_grad)
        assert bool(ours["lean"]) == (schedule in ("zbv", "interleaved_zb", "dualpipev")) and not ref["lean"], (schedule, ours["lean"])
        assert ours["losses"] == ref["losses"], schedule
        assert set(ours["state"]) == set(ref["state"])
        for name, p in ref["state"].items():
            assert torch.equal(ours["state"][name], p), f"{schedule}: {name} differs"


@pytest.mark.timeout(120)
def test_torch_orders_run_bitwise_equal_through_the_executor(tmp_path):
    run_distributed(_worker, 2, str(tmp_path), timeout=110)
    _assert_bitwise(tmp_path, ORDERS)


@pytest.mark.timeout(120)
def test_expert_parallel_stages_run_bitwise_equal_through_the_executor(tmp_path):
    # pp2 x ep2: the expert all-to-alls inside each stage pair up between the EP ranks, which
    # run the same action list
    orders = [("1f1b", 1), ("zbv", 2)]
    run_distributed(_worker, 4, str(tmp_path), orders, 2, timeout=110)
    _assert_bitwise(tmp_path, orders)


def one_f_one_b_table(pp: int, m: int) -> list[list[str]]:
    """1F1B written out by hand as a user would: warm-up forwards, alternate, drain."""
    rows = []
    for r in range(pp):
        warm = min(pp - 1 - r, m)
        cells = [f"{r}F{i}" for i in range(warm)]
        for i in range(m - warm):
            cells += [f"{r}F{warm + i}", f"{r}B{i}"]
        cells += [f"{r}B{i}" for i in range(m - warm, m)]
        rows.append(cells)
    return rows


def _write_csv(path, rows) -> str:
    path.write_text("# a hand-written 1F1B, one row per pipeline rank\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return str(path)


def _train(run_dir, *overrides) -> list[float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEPIPE_")}
    proc = subprocess.run([sys.executable, "-m", "moepipe.train", *TINY, "parallel=pp2", "parallel.ep=1", "schedule.microbatches=4",
                           "logger.progress=none", "train.log_every=1", "train.eval_every=0", "train.num_threads=1",
                           "train.ckpt_every=0", f"hydra.run.dir={run_dir}", *overrides],
                          capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r and r.get("event") is None]


@pytest.mark.timeout(200)
def test_a_csv_table_trains_through_moepipe_train_like_torch_1f1b(tmp_path):
    table = _write_csv(tmp_path / "my1f1b.csv", one_f_one_b_table(2, 4))
    with ThreadPoolExecutor(max_workers=2) as pool:  # two independent jobs: their start-ups overlap
        ours = pool.submit(_train, tmp_path / "csv", f"schedule.name=file:{table}", "schedule.executor=moepipe")
        ref = pool.submit(_train, tmp_path / "torch", "schedule.name=1f1b")
        ours, ref = ours.result(), ref.result()
    assert len(ours) == STEPS and ours == ref


# ------------------------------------------------------------------ schedules as data (pure)

def test_torch_orders_lower_and_simulate_from_one_program():
    for name, v in ORDERS + [("interleaved_zb", 2), ("dualpipev", 2), ("gpipe", 1)]:
        prog = schedule_program(name, 2, v, 4)
        order, s2r = schedule_order(name, 2, v, 4)
        assert order == prog.compute_order() and s2r == prog.stage_to_rank
        # every cross-rank hand-over has its send and its receive
        sends = sum(a.kind.startswith("SEND") for acts in prog.actions.values() for a in acts)
        recvs = sum(a.kind.startswith("RECV") for acts in prog.actions.values() for a in acts)
        hops = sum(s2r[s] != s2r[s + 1] for s in range(len(s2r) - 1))
        assert sends == recvs == 2 * hops * 4, name


def test_a_table_round_trips_and_a_written_program_validates(tmp_path):
    prog = schedule_program("zbv", 2, 2, 4)
    path = str(tmp_path / "zbv.csv")
    write_table(path, prog.actions)
    again = build_program(read_table(path), 2, 4, 4)  # with its sends/receives: checked as written
    assert again.actions == prog.actions and again.stage_to_rank == prog.stage_to_rank
    assert parse_action("(0F1;3B0)OVERLAP_F_B") == Action("FB", 0, 1, (Action("F", 0, 1), Action("B", 3, 0)))


def _rows(text: str) -> dict:
    return {r: [parse_action(c) for c in row.split()] for r, row in enumerate(text.strip().split("|"))}


BAD = [
    # (rows, expected fragment): one line each
    ("0F0 0F1 0B0 0B1 | 1F0 1B0 1F1", "stage 1 never runs the backward of microbatch 1"),
    ("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1 | 1RECV_F0 1F0 1B0 1SEND_B0 1F1 1B1 1SEND_B1",
     "rank 1 runs 1F1 without receiving its input first: add 1RECV_F1 before it"),
    ("0F0 0SEND_F0 0F1 0RECV_B0 0B0 0RECV_B1 0B1 | 1RECV_F0 1RECV_F1 1F0 1B0 1SEND_B0 1F1 1B1 1SEND_B1",
     "rank 1 receives 1RECV_F1 but rank 0 never sends it: add 0SEND_F1 after 0F1"),
    ("0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1 | 1RECV_F1 1RECV_F0 1F0 1B0 1SEND_B0 1F1 1B1 1SEND_B1",
     "messages between two ranks match in order"),
    ("0F0 0F1 0B1 0B0 | 1B0 1F0 1F1 1B1", "rank 1 runs 1B0 before 1F0"),
    ("0F0 0F1 0B0 0B1 | 1F1 1B1 1F0 1B0 1F0", "rank 1 runs 1F0 twice"),
    ("0B0 0F0 0F1 0B1 | 1F0 1B0 1F1 1B1", "rank 0 runs 0B0 before 0F0"),
    ("0F0 0B0 0F1 0B1 | 1F1 1B1 1F0 1B0", "the order deadlocks (simulated: no rank can run its next action): rank 0 at 0B0, rank 1 at 1F1"),
    ("0F0 0F1 0I0 0I1 0W1 | 1F0 1F1 1B0 1B1", "stage 0 runs 0I0 but never 0W0"),
    ("0F0 0F1 0B0 0B1 | 1F0 1F1 1B0 1W1", "rank 1 runs 1W1 without 1I1 before it"),
    ("0F0 0F1 0B0 0B1 | 0F0", "stage 0 runs on rank 0 and on rank 1"),
    ("0F0 0F1 0B0 0B1 | 1F0 1F2 1B0 1B2", "microbatch 2 is not in 0..1"),
]


@pytest.mark.parametrize("rows,fragment", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_tables_fail_with_one_line(rows, fragment):
    with pytest.raises(ScheduleError) as err:
        build_program(_rows(rows), 2, 2, 2)
    msg = str(err.value)
    assert "\n" not in msg and fragment in msg, msg


def test_bad_table_files_fail_through_config(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("0F0,0F1,0B0,0B1\n1F0,1X1\n")
    cfg = ["parallel=pp2", "parallel.ep=1", "schedule.microbatches=2", "schedule.executor=moepipe", f"schedule.name=file:{bad}"]
    with pytest.raises(ConfigError, match=r"rank 1 \(row 2\), cell 2: '1X1' is not an action"):
        schedule_order(f"file:{bad}", 2, 1, 2)
    with pytest.raises(ConfigError, match="set schedule.executor=moepipe"):
        compose_cfg(cfg[:-2] + [f"schedule.name=file:{bad}"])
    with pytest.raises(ConfigError, match="no such file"):
        compose_cfg(cfg[:-1] + [f"schedule.name=file:{tmp_path / 'none.csv'}"])
    good = _write_csv(tmp_path / "ok.csv", one_f_one_b_table(2, 2))
    with pytest.raises(ConfigError, match="the table has 2 rows and 2 stages, but parallel.pp=2 and schedule.virtual_stages=2"):
        schedule_order(f"file:{good}", 2, 2, 4)


def test_a_schedule_function_is_a_schedule(tmp_path):
    """A user's schedule: a ScheduleSpec with no torch class and an order function."""
    from moepipe.plugins import register, unregister
    from moepipe.plugins.builtins import ScheduleSpec

    register("schedule", "lifo_gpipe")(ScheduleSpec(None, order=lambda pp, v, m: {
        r: [("F", r, i) for i in range(m)] + [("B", r, i) for i in reversed(range(m))] for r in range(pp)}))
    try:
        prog = schedule_program("lifo_gpipe", 2, 1, 3)
        assert [str(a) for a in prog.actions[1]] == ["1RECV_F0", "1RECV_F1", "1RECV_F2", "1F0", "1F1", "1F2", "1B2",
                                                     "1SEND_B2", "1B1", "1SEND_B1", "1B0", "1SEND_B0"]
        with pytest.raises(ConfigError, match="has no torch class"):
            compose_cfg(["parallel=pp2", "parallel.ep=1", "schedule.microbatches=4", "schedule.name=lifo_gpipe"])
    finally:
        unregister("schedule", "lifo_gpipe")
