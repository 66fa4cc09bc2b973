"""Plug-ins: placers, forecasters, workloads, schedules and MoE backends found by name.

    from moepipe.plugins import register, resolve

    @register("placer", "mine")
    def mine(inputs, replica_slots, current): ...

Interfaces: moepipe.plugins.interfaces. Self-checks for a plug-in author:
moepipe.plugins.conformance. How names resolve: moepipe.plugins.registry.
"""
from moepipe.plugins.builtins import KINDS, ScheduleSpec
from moepipe.plugins.registry import known, register, resolve, unregister

__all__ = ["KINDS", "ScheduleSpec", "known", "register", "resolve", "unregister"]
