"""Re-plan decisions and events report the all-to-all bytes per link class of the current and
the proposed plan (issue 14): the figures are the placer evaluator's, so they equal a fresh
Evaluator.traffic of each plan."""
import numpy as np

from conftest import compose_cfg
from moepipe.placement.placers import Evaluator, decide, inputs_from_config
from moepipe.placement.plan import from_json
from moepipe.placement.replan import ReplanLoop, default_plan
from moepipe.placement.topology import from_config
from moepipe.placement.workloads import routing_origins

KEYS = ("a2a_bytes_intra_node", "a2a_bytes_inter_node")


def test_replan_event_reports_bytes_by_link_class_for_old_and_new_plans():
    cfg = compose_cfg(["topology=local_cpu_2nodes", "parallel.pp=1", "parallel.ep=4", "parallel.dp=1", "model.n_layers=2",
                       "schedule.microbatches=2", "placer.name=topo", "placer.replica_slots=1"], single_process=False)
    topo = from_config(cfg.topology, 4)
    layers = list(range(cfg.model.n_layers))
    origins = routing_origins("local_hot", 0, layers, cfg.moe.num_experts, 1000, cfg.moe.top_k, ep=4, strength=8.0)
    inputs = inputs_from_config(cfg, topo, expert_load={l: o.sum(0) for l, o in origins.items()}, origins=origins)
    current = default_plan(cfg)
    d = decide("topo", inputs, current, 1, horizon_steps=100)
    ev = Evaluator(inputs)
    for k in KEYS:
        assert np.isclose(d.traffic_old[k], ev.traffic(current)[k], rtol=1e-12)
        assert np.isclose(d.traffic_new[k], ev.traffic(d.candidate)[k], rtol=1e-12)
    assert d.traffic_new["a2a_bytes_inter_node"] < d.traffic_old["a2a_bytes_inter_node"]  # homes where the tokens start
    loop = ReplanLoop(cfg, topo)
    row = ReplanLoop.event(7, loop.judge(d, current, 100))
    assert row["event"] == "replan" and "plan" not in row
    for k in KEYS:
        assert row[f"{k}_old"] == d.traffic_old[k] and row[f"{k}_new"] == d.traffic_new[k]
    assert from_json(loop.judge(d, current, 100)["plan"]).ep == 4
