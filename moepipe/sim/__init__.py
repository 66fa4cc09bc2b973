"""Discrete-event simulator of one training iteration: a schedule's per-rank order on a topology."""
from moepipe.sim.schedules import Action, gpipe_order, one_f_one_b_order, schedule_order, torch_order
from moepipe.sim.simulator import SimResult, simulate, simulate_order

__all__ = ["Action", "SimResult", "gpipe_order", "one_f_one_b_order", "schedule_order", "simulate", "simulate_order", "torch_order"]
