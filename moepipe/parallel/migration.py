"""Live migration between plans: move parameters, buffers and AdamW state to their new owners.

The pure half works on names: every entry of the model's state (parameter or persistent
buffer, e.g. `layers.5.ffn.experts.3.w1.weight`) has a home under a plan, the global ranks
that hold it: all EP and DP ranks of its stage's pipeline rank, or for an expert only the EP
ranks listing it. Comparing homes under the old and new plan gives, for every rank, what it
must receive and from whom; every rank derives the same transfer list.

The process-group half sends one flat buffer per (source, destination) pair with
point-to-point operations posted together, so no ordering can deadlock. A parameter travels
with its AdamW state as [value, exp_avg, exp_avg_sq, step].
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moepipe.placement.plan import Plan, global_rank, pick_source


@dataclass(frozen=True)
class EntrySpec:
    shape: tuple[int, ...]
    is_param: bool

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def width(self) -> int:
        """Floats this entry occupies in a transfer buffer."""
        return 3 * self.numel + 1 if self.is_param else self.numel


def state_layout(model: torch.nn.Module) -> dict[str, EntrySpec]:
    """name -> spec of every parameter and persistent buffer of the full model (meta is fine)."""
    params = {n for n, _ in model.named_parameters()}
    return {n: EntrySpec(tuple(t.shape), n in params) for n, t in model.state_dict(keep_vars=True).items() if t is not None}


def home(name: str, plan: Plan) -> list[int]:
    """Global ranks that hold entry `name` under `plan` (ascending)."""
    parts = name.split(".")
    expert = None
    if parts[0] == "tok_embeddings":
        stage = 0
    elif parts[0] in ("norm", "output"):
        stage = plan.n_stages - 1
    elif parts[0] == "layers":
        layer = int(parts[1])
        stage = plan.stage_of_layer(layer)
        if len(parts) > 4 and parts[2] == "ffn" and parts[3] == "experts":
            expert = plan.expert_map[layer][int(parts[4])]
    else:
        raise ValueError(f"state entry {name!r} has no known home: teach moepipe.parallel.migration.home about it")
    pp_rank = plan.stage_to_pp_rank[stage]
    eps = range(plan.ep) if expert is None else expert
    return sorted(global_rank(pp_rank, e, d, plan.pp, plan.ep, plan.dp) for d in range(plan.dp) for e in eps)


def held_by(rank: int, plan: Plan, layout: dict[str, EntrySpec]) -> list[str]:
    return [n for n in layout if rank in home(n, plan)]


def transfers(old: Plan, new: Plan, layout: dict[str, EntrySpec], bandwidth=None) -> dict[tuple[int, int], list[str]]:
    """(source, destination) -> entry names, in a fixed order every rank agrees on. Sources:
    `pick_source` (the fastest link when `bandwidth` is given, which must then be the same on
    every rank)."""
    out: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name in sorted(layout):
        before, after = home(name, old), home(name, new)
        for dst in after:
            if dst not in before:
                out[(pick_source(dst, before, old, bandwidth), dst)].append(name)
    return dict(out)


def transfer_bytes(plan_transfers: dict[tuple[int, int], list[str]], layout: dict[str, EntrySpec], bytes_per_float: int = 4) -> int:
    return sum(layout[n].width for names in plan_transfers.values() for n in names) * bytes_per_float


# ---------------------------------------------------------------------------- process-group half

Entries = dict[str, list[torch.Tensor]]  # name -> [value] or [value, exp_avg, exp_avg_sq, step]


def _pack(names: list[str], entries: Entries, device: torch.device) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(device, torch.float32) for n in names for t in entries[n]])


def _unpack(buf: torch.Tensor, names: list[str], layout: dict[str, EntrySpec]) -> Entries:
    out, offset = {}, 0
    for n in names:
        spec = layout[n]
        parts = [spec.numel] * (3 if spec.is_param else 1) + ([1] if spec.is_param else [])
        ts = []
        for k in parts:
            ts.append(buf[offset : offset + k])  # views: the loader copies them into the new stages
            offset += k
        ts[0] = ts[0].view(spec.shape)
        if spec.is_param:
            ts[1], ts[2] = ts[1].view(spec.shape), ts[2].view(spec.shape)
        out[n] = ts
    return out


def exchange(rank: int, plan_transfers: dict[tuple[int, int], list[str]], entries: Entries, layout: dict[str, EntrySpec], device: torch.device) -> tuple[Entries, int]:
    """Send what this rank must give and receive what it must get; returns (received, bytes sent)."""
    ops, inbox, sent = [], [], 0
    for (src, dst), names in sorted(plan_transfers.items()):
        if src == rank:
            buf = _pack(names, entries, device)
            ops.append(dist.P2POp(dist.isend, buf, dst))
            sent += buf.numel() * buf.element_size()
        elif dst == rank:
            buf = torch.empty(sum(layout[n].width for n in names), device=device)
            ops.append(dist.P2POp(dist.irecv, buf, src))
            inbox.append((buf, names))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    received: Entries = {}
    for buf, names in inbox:
        received.update(_unpack(buf, names, layout))
    return received, sent
