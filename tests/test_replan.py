"""The re-plan loop (moepipe/placement/replan.py) driven by fake statistics: no process group."""
import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import compose_cfg
from moepipe.placement.placers import Decision
from moepipe.placement.plan import from_json
from moepipe.placement.forecast import ema, ema_update, last
from moepipe.placement.replan import ReplanLoop, default_plan
from moepipe.placement.topology import from_config
from moepipe.placement.workloads import routing_counts

E = 8
LAYOUT = ["parallel.pp=1", "parallel.ep=4", "parallel.dp=1", "model.n_layers=4", "moe.num_experts=8", "moe.top_k=2",
          "placer.interval=5", "train.steps=20", "placer.replica_slots=1", "schedule.microbatches=4"]


def make(*overrides, placer="topo", forecast=None) -> ReplanLoop:
    cfg = compose_cfg(LAYOUT + [f"placer.name={placer}", *overrides], single_process=False)
    return ReplanLoop(cfg, from_config(cfg.topology, 4), forecast)


def demand(loop: ReplanLoop, kind: str, strength: float = 1.0, step: int = 0) -> dict[int, np.ndarray]:
    """Whole-job tokens per expert for one step (what the trainer reduces across ranks)."""
    cfg = loop.cfg
    tokens = cfg.train.batch_size * cfg.train.seq_len
    ids = [lid for lid in range(cfg.model.n_layers)]
    return {lid: c.astype(np.float64) for lid, c in routing_counts(kind, step, ids, E, tokens, cfg.moe.top_k, strength=strength).items()}


def test_ema_is_the_trainers_moving_average_bit_for_bit():
    loop = make("placer.ema_decay=0.7")
    rng = np.random.default_rng(1)
    steps = [{0: rng.integers(0, 500, E).astype(np.float64), 2: rng.integers(0, 500, E).astype(np.float64)} for _ in range(6)]
    blocks = [rng.random(4) for _ in range(6)]
    ref_load, ref_time, ref_step = {}, None, None
    for i, (d, b) in enumerate(zip(steps, blocks)):
        secs = 0.1 + 0.01 * i
        loop.observe(i, d, b if i else None, secs)
        for lid, x in d.items():  # the arithmetic DistributedTrainer used before the loop was a component
            prev = ref_load.get(lid)
            ref_load[lid] = x.copy() if prev is None else 0.7 * prev + (1 - 0.7) * x
        if i:
            ref_time = b if ref_time is None else 0.7 * ref_time + (1 - 0.7) * b
            ref_step = secs if ref_step is None else 0.8 * ref_step + 0.2 * secs
    assert loop.load_ema.keys() == ref_load.keys()
    for lid in ref_load:
        assert np.array_equal(loop.load_ema[lid], ref_load[lid])
    assert np.array_equal(loop.time_ema, ref_time) and loop.step_time_ema == ref_step
    assert np.array_equal(ema([steps[0][0], steps[1][0]], 5, 0.7).mean, 0.7 * steps[0][0] + (1 - 0.7) * steps[1][0])
    assert np.array_equal(ema([steps[0][0]], 5, 0.7).mean, steps[0][0])
    # the default forecaster plans on exactly that running average; it keeps no window
    assert {lid: f.mean for lid, f in loop.forecast_loads(5).items()}.keys() == ref_load.keys()
    assert all(np.array_equal(f.mean, ref_load[lid]) for lid, f in loop.forecast_loads(5).items()) and not loop.load_history


def test_the_configured_forecaster_feeds_the_placer():
    """placer.forecast picks the forecast (a plug-in by name or import path) the placer gets at
    each re-plan, from the newest placer.forecast_window steps and horizon = the steps the plan
    will run; load_ema and block times stay EMAs."""
    assert make().forecast is ema
    loop = make("placer.forecast=last")
    assert loop.forecast is last
    loop.observe(0, {0: np.full(E, 4.0)}, np.ones(4), 1.0)
    loop.observe(1, {0: np.arange(E, dtype=float)}, np.zeros(4), 1.0)
    assert np.array_equal(loop.forecast_loads(5)[0].mean, np.arange(E, dtype=float))  # no smoothing
    assert np.array_equal(loop.load_ema[0], ema_update(np.full(E, 4.0), np.arange(E, dtype=float), loop.cfg.placer.ema_decay))
    assert np.array_equal(loop.time_ema, ema([np.ones(4), np.zeros(4)], 1, loop.cfg.placer.ema_decay).mean)
    calls = []

    def own(history, horizon, decay):
        calls.append((history.shape, horizon, decay))
        return np.full(history.shape[1], float(len(calls)))

    mine = make("placer.forecast_window=3", "placer.ema_decay=0.6", forecast=own)  # interval 5, 20 steps
    for s in range(4):
        mine.observe(s, {0: np.full(E, float(s)), 2: np.ones(E)}, None, 1.0)
    assert calls == [] and [list(w) for w in mine.load_history.values()][0][0][0] == 1.0  # the oldest step fell out
    mine.propose(18, default_plan(mine.cfg))
    assert calls == [((3, E), 2, 0.6), ((3, E), 2, 0.6)]  # a call per MoE layer at propose; 2 steps left
    assert [f.mean[0] for f in mine.last_forecast.values()] == [1.0, 2.0]


def test_a_forecasters_window_survives_a_checkpoint():
    loop = make("placer.forecast=window", "placer.forecast_window=4")
    for s in range(6):
        loop.observe(s, {1: np.full(E, float(s))}, None, 1.0)
    state = loop.state_dict()
    assert state["load_history.1"].shape == (4, E) and state["load_history.1"][:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    back = make("placer.forecast=window", "placer.forecast_window=4")
    back.load_state_dict(state)
    assert np.array_equal(back.forecast_loads(5)[1].mean, np.full(E, 3.5))
    back.observe(6, {1: np.full(E, 6.0)}, None, 1.0)  # the window stays bounded after a resume
    assert len(back.load_history[1]) == 4 and back.forecast_loads(5)[1].mean[0] == 4.5
    older = make("placer.forecast=window")  # a checkpoint without a window: plan on the running EMA
    older.load_state_dict({"load_ema.1": np.ones(E)})
    assert np.array_equal(older.forecast_loads(5)[1].mean, np.ones(E))


def test_periodic_forecast_follows_a_moving_hot_spot_the_ema_lags():
    """A hot block moving by half a block every 5 steps: the periodic forecaster plans for where
    it will be over the next interval; the EMA for where it was."""
    hot = np.ones(E)
    hot[:2] = 10.0

    def load(s):
        return np.roll(hot, s // 5)

    loops = {name: make(f"placer.forecast={name}", "placer.forecast_window=20") for name in ("ema", "periodic")}
    for s in range(20):
        for lp in loops.values():
            lp.observe(s, {0: load(s)}, None, 1.0)
    future = np.mean([load(s) for s in range(20, 25)], axis=0)
    assert np.allclose(loops["periodic"].forecast_loads(5)[0].mean, future)
    lagged = loops["ema"].forecast_loads(5)[0].mean
    assert 0.5 * np.abs(lagged / lagged.sum() - future / future.sum()).sum() > 0.3  # total variation: measured 0.46


def test_first_step_time_is_not_counted():
    loop = make()
    loop.observe(0, {}, None, 9.0)
    assert loop.step_time_ema is None
    loop.observe(1, {}, None, 1.0)
    assert loop.step_time_ema == 1.0


def test_due_every_interval_never_after_the_last_step():
    loop = make()  # interval 5, 20 steps
    assert [d for d in range(0, 25) if loop.due(d)] == [0, 5, 10, 15]
    assert loop.horizon(15) == 5
    off = make("placer.interval=0")
    assert not any(off.due(d) for d in range(25))
    short = make("placer.interval=8", "train.steps=20")
    assert [d for d in range(1, 25) if short.due(d)] == [8, 16] and short.horizon(16) == 4


@pytest.mark.parametrize("placer", ["topo", "eplb"])
def test_skewed_load_migrates_uniform_load_does_not(placer):
    loop = make(placer=placer)
    current = default_plan(loop.cfg)
    for s in range(5):
        loop.observe(s, demand(loop, "none", step=s), None, 0.5)
    kept = loop.propose(5, current)
    assert not kept["migrate"] and from_json(kept["plan"]) == current
    for s in range(5, 10):
        loop.observe(s, demand(loop, "zipf", 1.5, step=s), None, 0.5)
    moved = loop.propose(10, current)
    assert moved["migrate"], moved["reason"]
    assert moved["predicted_new_s"] < moved["predicted_old_s"] and from_json(moved["plan"]) != current
    assert moved["expected_gain_s"] > moved["predicted_migration_s"]


def _decision(old=1.0, new=0.5, gain=10.0, cost=1.0, migrate=True, plan=None) -> Decision:
    return Decision(plan, migrate, old, new, gain, cost, 100, 0.01, "placer says move", plan)


def test_judge_rechecks_in_measured_units():
    loop = make("placer.min_gain_frac=0.05")
    current = default_plan(loop.cfg)
    other = replace(current, expert_map=current.expert_map | {0: [[3]] + current.expert_map[0][1:7] + [[0]]})  # two experts swap ranks
    assert other != current
    # the placer's own "keep" stands
    assert loop.judge(_decision(migrate=False, plan=current), current, 5)["reason"] == "placer says move"
    # measured step time 4x the prediction: the gain scales with it
    loop.step_time_ema = 4.0
    ok = loop.judge(_decision(plan=other), current, 5)
    assert ok["migrate"] and ok["time_scale"] == 4.0 and ok["expected_gain_s"] == 40.0
    # past migrations showed 8% of predicted savings: 50% * 0.08 = 4% <= min_gain_frac 5%
    loop.gain_efficiency = 0.08
    low = loop.judge(_decision(plan=other), current, 5)
    assert not low["migrate"] and "<= min_gain_frac 5.00%" in low["reason"] and "x0.08" in low["reason"]
    assert from_json(low["plan"]) == current
    # gain 10 s x 4 x 0.5 = 20 s against 1 s transfer + 30 s measured rebuild
    loop.gain_efficiency, loop.rebuild_s = 0.5, 30.0
    slow = loop.judge(_decision(plan=other), current, 5)
    assert not slow["migrate"] and slow["reason"] == "measured-scale gain 20 s over 5 steps <= migration 31 s (incl. rebuild)"
    assert slow["predicted_migration_s"] == 31.0


def test_recorded_migration_teaches_rebuild_time_and_efficiency():
    loop = make()
    loop.step_time_ema = 2.0
    loop.record_migration({"predicted_old_s": 1.0, "predicted_new_s": 0.5, "predicted_migration_s": 0.25, "migration_s": 1.0})
    assert loop.rebuild_s == 0.75  # measured 1.0 s, the transfer estimate 0.25 s
    loop.record_migration({"predicted_old_s": 1.0, "predicted_new_s": 0.5, "predicted_migration_s": 0.25 + 0.75, "migration_s": 0.5})
    assert loop.rebuild_s == 0.25  # the estimate included the old rebuild figure
    loop.step_time_ema = 1.5  # predicted 50% saving, measured 2.0 -> 1.5 s (25%): half showed
    loop.settle()
    assert loop.gain_efficiency == pytest.approx(0.75)  # 0.5 * 1.0 + 0.5 * 0.5
    loop.settle()  # idempotent until the next migration
    assert loop.gain_efficiency == pytest.approx(0.75)


def test_event_rows_keep_the_metrics_keys():
    d = {"placer": "topo", "migrate": True, "reason": "r", "plan": "{}"}
    row = ReplanLoop.event(10, d, {"bytes_moved": 5, "migration_s": 0.1, "plan": "new"})
    assert list(row) == ["step", "event", "placer", "migrate", "reason", "bytes_moved", "migration_s", "plan"]
    assert row["event"] == "replan" and row["plan"] == "new"
    kept = ReplanLoop.event(10, d | {"migrate": False}, advisory=True)
    assert kept["advisory"] is True and "plan" not in kept


def test_state_dict_round_trip_keeps_the_checkpoint_keys():
    loop = make()
    loop.observe(0, {1: np.arange(E, dtype=float), 3: np.ones(E)}, None, 1.0)
    loop.observe(1, {1: np.ones(E), 3: np.arange(E, dtype=float)}, np.array([0.1, 0.2, 0.3, 0.4]), 1.0)
    loop.rebuild_s, loop.gain_efficiency = 0.3, 0.6
    state = loop.state_dict()
    assert list(state) == ["load_ema.1", "load_ema.3", "time_ema", "step_time_ema", "rebuild_s", "gain_efficiency"]
    torch = pytest.importorskip("torch")
    back = make()
    back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})  # as a checkpoint returns them
    assert back.state_dict().keys() == state.keys()
    for k, v in state.items():
        assert np.array_equal(back.state_dict()[k], v), k
    fresh = make()
    fresh.load_state_dict({})
    assert fresh.state_dict() == {"rebuild_s": 0.0, "gain_efficiency": 1.0}


def test_one_process_logs_advisory_decisions(tmp_path, capsys):
    """The single-process trainer runs the same loop in advisory mode: decisions are logged as
    replan events, listed in summary.json, and nothing moves."""
    import torch

    from moepipe.train.loop import train

    cfg = compose_cfg(["model.d_model=32", "model.n_heads=2", "model.ffn_hidden=64", "model.n_layers=2", "moe.num_experts=4",
                       "moe.expert_hidden=32", "train.batch_size=4", "train.seq_len=16", "train.steps=5", "train.eval_every=0",
                       "train.eval_batches=1", "train.log_every=2", "data.max_bytes=100000", "logger.progress=none", "placer.name=topo",
                       "placer.interval=2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(cfg, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    replans = [r for r in rows if r.get("event") == "replan"]
    assert [r["step"] for r in replans] == [2, 4] and all(r["advisory"] is True for r in replans)
    assert all(r["placer"] == "topo" and not r["migrate"] and r["predicted_old_s"] > 0 for r in replans)  # one device: nothing to move
    place = summary["placement"]
    assert place["mode"] == "advisory" and place["replans"] == 2 and place["would_migrate"] == 0
    assert [e["step"] for e in place["events"]] == [2, 4] and place["events"][0]["reason"] == replans[0]["reason"]
    assert "is advisory" in capsys.readouterr().err
    assert rows.index(replans[0]) == rows.index(next(r for r in rows if r["step"] == 2 and "loss" in r)) + 1  # after the step's row


@pytest.mark.parametrize("value", [0, -3])
def test_forecast_window_is_checked_in_one_line(value):
    from moepipe.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose_cfg([f"placer.forecast_window={value}"])
    msg = str(err.value)
    assert msg.startswith(f"placer.forecast_window={value} must be an integer >= 1: ") and "\n" not in msg


def test_shadow_backoff_spaces_out_replans_that_keep_the_layout():
    """placer.shadow_slots > 0: each kept layout doubles the gap to the next re-plan (up to
    placer.shadow_backoff x interval); a migration returns to every interval; the schedule
    survives a checkpoint; without shadows nothing changes."""
    loop = make("placer.shadow_slots=1", "placer.shadow_backoff=4", "train.steps=100")  # interval 5
    seen, keep = [], {"migrate": False}
    for d in range(1, 100):
        if loop.due(d):
            seen.append(d)
            loop.note_decision(d, {"migrate": d == 55} | ({} if d == 55 else keep))
    # gaps 10, 20, 20 (capped at 4 x 5) ..., then every 5 after the migration at 55, doubling again
    assert seen == [5, 15, 35, 55, 60, 70, 90], seen
    state = loop.state_dict()
    assert state["next_replan"] == 110 and state["replan_gap"] == 20
    back = make("placer.shadow_slots=1", "placer.shadow_backoff=4", "train.steps=200")
    back.load_state_dict(state)
    assert [d for d in range(91, 115) if back.due(d)] == [110]
    # shadows off (or shadow_backoff=1): every interval, whatever the decisions
    for off in (make("train.steps=100"), make("placer.shadow_slots=1", "placer.shadow_backoff=1", "train.steps=100")):
        for d in range(1, 100):
            if off.due(d):
                off.note_decision(d, keep)
        assert [d for d in range(1, 100) if off.due(d)] == list(range(5, 100, 5)) and "next_replan" not in off.state_dict()
    # a resume with shadows off forgets the back-off
    plain = make("train.steps=200")
    plain.load_state_dict(state)
    assert plain.due(95) and plain.next_replan is None
