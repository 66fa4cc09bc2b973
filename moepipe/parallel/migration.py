"""Live migration between plans: move parameters, buffers and AdamW state to their new owners.

The pure half works on names: every entry of the model's state (parameter or persistent
buffer, e.g. `layers.5.ffn.experts.3.w1.weight`) has a home under a plan, the global ranks
that hold it: all EP and DP ranks of its stage's pipeline rank, or for an expert only the EP
ranks listing it. Comparing homes under the old and new plan gives, for every rank, what it
must receive and from whom; every rank derives the same transfer list.

The process-group half sends every tensor as its own point-to-point message, all posted
together, so no ordering can deadlock and nothing is packed or unpacked. A parameter travels
with its AdamW state as [value, exp_avg, exp_avg_sq, step].
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moepipe.placement.plan import Plan, global_rank, pick_source, stage_pp_ranks


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


def home(name: str, plan: Plan, chains: int = 1) -> list[int]:
    """Global ranks that hold entry `name` under `plan` (ascending); `chains` = 2: every stage
    also on its mirrored pp rank (chimera's second replica, plan.stage_pp_ranks)."""
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
    eps = range(plan.ep) if expert is None else expert
    return sorted(global_rank(p, e, d, plan.pp, plan.ep, plan.dp) for p in stage_pp_ranks(plan, stage, chains)
                  for d in range(plan.dp) for e in eps)


def held_by(rank: int, plan: Plan, layout: dict[str, EntrySpec], chains: int = 1) -> list[str]:
    return [n for n in layout if rank in home(n, plan, chains)]


def transfers(old: Plan, new: Plan, layout: dict[str, EntrySpec], bandwidth=None, chains: int = 1) -> dict[tuple[int, int], list[str]]:
    """(source, destination) -> entry names, in a fixed order every rank agrees on. Sources:
    `pick_source` (the fastest link when `bandwidth` is given, which must then be the same on
    every rank). `chains` = 2: both replicas of every stage move (home)."""
    out: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name in sorted(layout):
        before, after = home(name, old, chains), home(name, new, chains)
        for dst in after:
            if dst not in before:
                out[(pick_source(dst, before, old, bandwidth), dst)].append(name)
    return dict(out)


def transfer_bytes(plan_transfers: dict[tuple[int, int], list[str]], layout: dict[str, EntrySpec], bytes_per_float: int = 4) -> int:
    return sum(layout[n].width for names in plan_transfers.values() for n in names) * bytes_per_float


# ---------------------------------------------------------------------------- process-group half

Entries = dict[str, list[torch.Tensor]]  # name -> [value] or [value, exp_avg, exp_avg_sq, step]


def _outgoing(names: list[str], entries: Entries, device: torch.device) -> list[torch.Tensor]:
    """The tensors of one (source, destination) message, in the order both sides derive from the
    names: each entry's value (and AdamW moments), then one float32 tensor of all its
    parameters' step counts. A tensor already fp32, contiguous and on `device` goes as it is."""
    out, steps = [], []
    for n in names:
        ts = entries[n]
        out += [t.detach().to(device, torch.float32).contiguous() for t in ts[:3]]
        if len(ts) > 3:
            steps.append(ts[3].detach().reshape(-1)[:1].to(device, torch.float32))
    if steps:
        out.append(torch.cat(steps))
    return out


def _incoming(names: list[str], layout: dict[str, EntrySpec], device: torch.device) -> tuple[list[torch.Tensor], Entries]:
    """Receive tensors matching `_outgoing`, and the entries they become: the final tensors
    themselves, so nothing is unpacked or copied after arrival."""
    out: list[torch.Tensor] = []
    entries: Entries = {}
    for n in names:
        spec = layout[n]
        entries[n] = [torch.empty(spec.shape, device=device) for _ in range(3 if spec.is_param else 1)]
        out += entries[n]
    params = [n for n in names if layout[n].is_param]
    if params:
        steps = torch.empty(len(params), device=device)
        out.append(steps)
        for i, n in enumerate(params):
            entries[n].append(steps[i : i + 1])
    return out, entries


def exchange(rank: int, plan_transfers: dict[tuple[int, int], list[str]], entries: Entries, layout: dict[str, EntrySpec], device: torch.device,
             peer=None) -> tuple[Entries, int]:
    """Send what this rank must give and receive what it must get; returns (received, bytes sent).
    Each tensor is its own message, all posted together: no packing copy on the sender, no
    unpacking copy on the receiver (a migration's extra memory is just what arrives).
    `rank` and the transfer list speak the plan's mesh ranks; `peer` maps one to the process
    to talk to (tensor parallelism: the rank holding the same TP shard there)."""
    peer = peer or (lambda r: r)
    ops, sent = [], 0
    received: Entries = {}
    for (src, dst), names in sorted(plan_transfers.items()):
        if src == rank:
            for t in _outgoing(names, entries, device):
                ops.append(dist.P2POp(dist.isend, t, peer(dst)))
                sent += t.numel() * t.element_size()
        elif dst == rank:
            bufs, arriving = _incoming(names, layout, device)
            ops += [dist.P2POp(dist.irecv, t, peer(src)) for t in bufs]
            received.update(arriving)
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return received, sent
