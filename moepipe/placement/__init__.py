"""Placement: where blocks and experts run. Pure python/numpy, no process groups.

topology.py (the cluster), plan.py (a placement), model_spec.py and cost_model.py (what a
block costs), workloads.py and forecast.py (expert load), placers/ (the placers) and
replan.py (the re-plan loop). Import the module you need: this package imports nothing, so
reading the topology (config validation does) does not pull in the rest.
"""
