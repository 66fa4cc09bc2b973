"""Routing statistics a MoE layer accumulates: what the metrics and the placer read."""
from __future__ import annotations

import torch


class RoutingStats:
    """Counters a layer accumulates between `reset()` calls: what the placer and the metrics read.

    They stay on the layer's device and are added to without reading them back (no host
    synchronisation in the hot path); the trainer reads them once per step. Every MoE backend
    records through `add` (or bumps `calls` with any counter it changes), so the metrics and the
    placer see the same counters whatever runs the experts.
    """

    def __init__(self, num_experts: int, source: int = 0, n_sources: int = 1):
        self.num_experts = num_experts
        self.set_source(source, n_sources)

    def set_source(self, source: int, n_sources: int) -> None:
        """Token origins: this layer's tokens start on EP rank `source` of `n_sources` (the
        runtime sets its EP rank; one process is the single source). `origins` [n_sources, E]
        counts demand in row `source` only, so summing every rank's counters (the trainer's
        all-reduce) gives tokens per (source EP rank, expert) with no extra communication.
        Starts a fresh count."""
        if not 0 <= int(source) < int(n_sources):
            raise ValueError(f"routing-stats source={source} must be in [0, {n_sources}): pass the EP rank and EP size")
        self.source, self.n_sources = int(source), int(n_sources)
        self.reset()

    def reset(self) -> None:
        # stay on the counters' device; but a meta one (a stage built before materialising)
        # holds no data: start on the default device then
        dev = self.demand.device if hasattr(self, "demand") else None
        self._zeros(None if dev is not None and dev.type == "meta" else dev)

    def _zeros(self, dev: torch.device | None) -> None:
        self.demand = torch.zeros(self.num_experts, dtype=torch.long, device=dev)  # assignments asked of each expert (before capacity)
        self.origins = torch.zeros(self.n_sources, self.num_experts, dtype=torch.long, device=dev)  # demand by source EP rank (row `source`)
        self.kept = torch.zeros(self.num_experts, dtype=torch.long, device=dev)  # assignments each expert processed
        self.asked = torch.zeros((), dtype=torch.long, device=dev)  # assignments requested (tokens * k)
        self.aux_loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.z_loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.calls = 0

    @torch.no_grad()
    def add(self, demand: torch.Tensor, kept: torch.Tensor, aux_loss: torch.Tensor | None = None,
            z_loss: torch.Tensor | None = None, asked: torch.Tensor | int | None = None) -> None:
        """Accumulate one forward's counters (device tensors; nothing is read back).
        `asked` defaults to demand.sum() (every assignment is counted in demand)."""
        dev = demand.device
        if self.demand.device != dev:  # the counters follow the layer's device
            if self.calls == 0:  # nothing counted yet: zeros made there, not a blocking copy
                self._zeros(dev)
            else:
                self.demand, self.kept, self.origins = self.demand.to(dev), self.kept.to(dev), self.origins.to(dev)
                self.asked, self.aux_loss_sum, self.z_loss_sum = self.asked.to(dev), self.aux_loss_sum.to(dev), self.z_loss_sum.to(dev)
        self.demand += demand.detach().long()
        self.origins[self.source] += demand.detach().long()
        self.kept += kept.detach().long()
        self.asked += demand.detach().sum() if asked is None else asked
        if aux_loss is not None:
            self.aux_loss_sum += aux_loss.detach().double()
        if z_loss is not None:
            self.z_loss_sum += z_loss.detach().double()
        self.calls += 1

    def record(self, routing: Routing) -> None:
        self.add(routing.demand_counts, routing.kept_counts, routing.aux_loss, routing.z_loss)

    def host(self) -> "RoutingStats":
        """A copy on the host (plain CPU tensors and numbers) in one device-to-host read: the
        trainer calls it once per step. The counters travel as float64, exact below 2**53."""
        E = self.num_experts
        packed = torch.cat([self.demand.double(), self.kept.double(),
                            torch.stack([self.asked.double(), self.aux_loss_sum.double(), self.z_loss_sum.double()]),
                            self.origins.double().reshape(-1)])
        vals = packed.tolist()
        out = RoutingStats.__new__(RoutingStats)
        out.num_experts, out.calls, out.source, out.n_sources = E, self.calls, self.source, self.n_sources
        out.origins = torch.tensor(vals[2 * E + 3 :], dtype=torch.float64).long().view(self.n_sources, E)
        out.demand = torch.tensor(vals[:E], dtype=torch.float64).long()
        out.kept = torch.tensor(vals[E : 2 * E], dtype=torch.float64).long()
        out.asked, out.aux_loss_sum, out.z_loss_sum = int(vals[2 * E]), vals[2 * E + 1], vals[2 * E + 2]
        return out
