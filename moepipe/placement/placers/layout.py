"""EP group layout: which physical devices form an expert-parallel group.

The runtime's mesh fixes the rank order `rank = ep_rank + ep*(pp_rank + pp*dp_rank)` (EP
fastest: EP groups are consecutive devices, inside a node when ep <= devices_per_node). The
placer can price the other natural order here, EP slowest (`ep_outer`: device =
pp_rank + pp*(dp_rank + dp*ep_rank)), which spreads every EP group over nodes and keeps the
pipeline and data-parallel peers adjacent. Each layout is solved by the same placer on the
topology with its devices renumbered in plan-rank order, with the replica rule's nodes taken
from the group's real layout, and simulated; the report says which is faster and by how much.
The runtime keeps its order: this is advice (plan.meta["ep_layout"], moepipe-sim's summary).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np

from moepipe.config import ConfigError
from moepipe.placement.plan import mesh_coords
from moepipe.placement.placers.evaluate import Evaluator
from moepipe.placement.placers.inputs import PlacementInputs
from moepipe.placement.topology import Topology

EP_LAYOUTS = ("ep_inner", "ep_outer")
RUNTIME_LAYOUT = "ep_inner"  # moepipe.parallel.mesh.build_mesh's order


def device_order(layout: str, pp: int, ep: int, dp: int) -> np.ndarray:
    """[world]: the physical device of each plan rank (plan order: ep fastest, then pp, dp)."""
    world = pp * ep * dp
    if layout == "ep_inner":
        return np.arange(world)
    if layout != "ep_outer":
        raise ConfigError(f"ep layout={layout!r} is not one of {list(EP_LAYOUTS)}")
    out = np.empty(world, dtype=np.int64)
    for r in range(world):
        p, e, d = mesh_coords(r, pp, ep, dp)
        out[r] = p + pp * (d + dp * e)
    return out


def renumbered(topo: Topology, order: np.ndarray) -> Topology:
    """The topology with device `order[r]` as rank r (devices beyond the job keep their order)."""
    idx = np.concatenate([order, np.setdiff1d(np.arange(topo.n_devices), order)])
    return topo.subset(idx)  # keeps the TP group fields (tp_groups) of each device


def layouts_differ(inputs: PlacementInputs) -> bool:
    """Both orders are distinct and the job spans more than one node (else nothing to compare)."""
    i = inputs
    nodes = i.topology.node_of[: i.world]
    return i.ep > 1 and i.pp * i.dp > 1 and len(np.unique(nodes)) > 1


def layout_evaluator(inputs: PlacementInputs, layout: str) -> Evaluator:
    """An Evaluator of the job under `layout`: devices renumbered, and the nearest-replica rule
    seeing each EP rank's real node (under ep_outer a node's EP ranks are not consecutive)."""
    order = device_order(layout, inputs.pp, inputs.ep, inputs.dp)
    ev = Evaluator(dataclasses.replace(inputs, topology=renumbered(inputs.topology, order)))
    node = ev.topo.node_of[ev.grid[0, 0]]
    ev.rule_nodes = np.unique(node, return_inverse=True)[1]
    return ev


def compare_ep_layouts(name, inputs: PlacementInputs, replica_slots: int, runtime_plan=None) -> Optional[dict]:
    """Solve and simulate the job under each EP layout with placer `name`. Returns
    {"runtime": ..., "best": ..., "speedup_best_vs_runtime": ..., "layouts": {layout:
    {predicted_s, a2a_bytes_intra_node, a2a_bytes_inter_node, ep_group_nodes, solve_time_s}}},
    or None when the layouts do not differ. `runtime_plan`: the plan already solved for the
    runtime's order (not solved again)."""
    from moepipe.placement.placers import make_placement

    if not layouts_differ(inputs):
        return None
    out = {}
    for layout in EP_LAYOUTS:
        t0 = time.perf_counter()
        ev = layout_evaluator(inputs, layout)
        try:
            plan = runtime_plan if (layout == RUNTIME_LAYOUT and runtime_plan is not None) else make_placement(
                name, ev.inputs, replica_slots, evaluator=ev, compare_layouts=False)
        except ConfigError as err:  # e.g. this layout's plan does not fit memory
            out[layout] = {"error": str(err).splitlines()[0]}
            continue
        res = ev.evaluate(plan)
        out[layout] = {"predicted_s": res.iteration_time_s, **ev.traffic(plan),
                       "ep_group_nodes": int(len(np.unique(ev.topo.node_of[ev.grid[0, 0]]))), "solve_time_s": time.perf_counter() - t0}
    ok = {k: v for k, v in out.items() if "predicted_s" in v}
    if RUNTIME_LAYOUT not in ok:
        return {"runtime": RUNTIME_LAYOUT, "best": None, "layouts": out}
    best = min(ok, key=lambda k: (ok[k]["predicted_s"], k != RUNTIME_LAYOUT))
    return {"runtime": RUNTIME_LAYOUT, "best": best, "speedup_best_vs_runtime": ok[RUNTIME_LAYOUT]["predicted_s"] / ok[best]["predicted_s"],
            "runtime_keeps_its_order": True, "layouts": out}
