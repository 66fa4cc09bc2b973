"""The MoE hot path makes no host synchronisation beyond its one read of split sizes.

On a GPU every device-to-host read (`.item()`, `.tolist()`, `int(t)`, `if t:`), every
data-dependent shape (boolean-mask indexing, `nonzero`, `bincount`, `repeat_interleave`
without `output_size`) and every blocking host-to-device copy (`torch.tensor(...)` or
`.to(device)` of host data) makes the host wait for the device, which stalls the pipeline.
On the CPU none of them waits, so this guard counts the *calls* that would, during one MoE
layer's forward and backward, and the tests assert the exact number allowed: one read of the
split sizes per layer per microbatch (the per-expert slice sizes of the local dispatch; the
gathered send/receive sizes of the expert-parallel all-to-all). Everything else, the routing
statistics included, stays on the device until the trainer reads it once per step.

The guard sees Python-level calls only (C++ kernels that read back internally are out of
its reach); that is why it also counts the ops whose CUDA kernels do, such as `bincount`.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from moepipe.config import MoEConfig
from moepipe.model.moe import MoELayer
from moepipe.model.router import route
from moepipe.model.expert_dispatch import ExpertParallelDispatcher

from dist_utils import run_distributed

D, E = 16, 8
_HERE = os.path.dirname(os.path.abspath(__file__))
_PKG = os.path.join(os.path.dirname(_HERE), "moepipe")

pytestmark = pytest.mark.usefixtures("one_thread")


def _is_mask(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(_is_mask(i) for i in index)
    return False


def _names_device(args, kwargs) -> bool:
    """Tensor.to(...) arguments that name a device (a dtype-only cast moves nothing)."""
    if "device" in kwargs or any(isinstance(a, torch.Tensor) for a in args):
        return True
    return any(isinstance(a, (torch.device, str, int)) and not isinstance(a, bool) for a in args)


# name -> (owner, attribute, predicate(args, kwargs) -> counts as a synchronisation)
_ALWAYS = lambda args, kwargs: True  # noqa: E731
_ENTRY_POINTS = {
    "Tensor.item": (torch.Tensor, "item", _ALWAYS),
    "Tensor.tolist": (torch.Tensor, "tolist", _ALWAYS),
    "Tensor.cpu": (torch.Tensor, "cpu", _ALWAYS),
    "Tensor.cuda": (torch.Tensor, "cuda", _ALWAYS),
    "Tensor.numpy": (torch.Tensor, "numpy", _ALWAYS),
    "Tensor.__int__": (torch.Tensor, "__int__", _ALWAYS),
    "Tensor.__float__": (torch.Tensor, "__float__", _ALWAYS),
    "Tensor.__bool__": (torch.Tensor, "__bool__", _ALWAYS),
    "Tensor.__index__": (torch.Tensor, "__index__", _ALWAYS),
    "Tensor.to(device)": (torch.Tensor, "to", lambda args, kwargs: _names_device(args[1:], kwargs)),
    "Tensor.new_tensor": (torch.Tensor, "new_tensor", _ALWAYS),  # on self's device: a copy from the host
    "Tensor.nonzero": (torch.Tensor, "nonzero", _ALWAYS),
    "Tensor.masked_select": (torch.Tensor, "masked_select", _ALWAYS),
    "Tensor.bincount": (torch.Tensor, "bincount", _ALWAYS),
    "Tensor.unique": (torch.Tensor, "unique", _ALWAYS),
    "Tensor.repeat_interleave": (torch.Tensor, "repeat_interleave",
                                 lambda args, kwargs: isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None),
    "Tensor[mask]": (torch.Tensor, "__getitem__", lambda args, kwargs: _is_mask(args[1])),
    "Tensor[mask]=": (torch.Tensor, "__setitem__", lambda args, kwargs: _is_mask(args[1])),
    # host data copied to a device (a plain CPU tensor moves nothing)
    "torch.tensor": (torch, "tensor", lambda args, kwargs: kwargs.get("device") is not None),
    "torch.as_tensor": (torch, "as_tensor", lambda args, kwargs: kwargs.get("device") is not None),
    "torch.nonzero": (torch, "nonzero", _ALWAYS),
    "torch.argwhere": (torch, "argwhere", _ALWAYS),
    "torch.masked_select": (torch, "masked_select", _ALWAYS),
    "torch.bincount": (torch, "bincount", _ALWAYS),
    "torch.unique": (torch, "unique", _ALWAYS),
    "torch.where(cond)": (torch, "where", lambda args, kwargs: len(args) + len(kwargs) == 1),
    "torch.repeat_interleave": (torch, "repeat_interleave",
                                lambda args, kwargs: len(args) > 1 and isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None),
    "torch.cuda.synchronize": (torch.cuda, "synchronize", _ALWAYS),
}


class SyncGuard:
    """Counts calls that would make the host wait for a CUDA device, with the moepipe line of each."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self._saved: list[tuple[object, str, object]] = []
        self._inside = threading.local()

    def _wrap(self, name, fn, counts):
        guard = self

        def wrapper(*args, **kwargs):
            if getattr(guard._inside, "depth", 0) == 0 and counts(args, kwargs):
                guard.calls[f"{name} at {guard._site()}"] += 1
            guard._inside.depth = getattr(guard._inside, "depth", 0) + 1
            try:
                return fn(*args, **kwargs)
            finally:
                guard._inside.depth -= 1

        return wrapper

    @staticmethod
    def _site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if frame.filename.startswith(_PKG):
                return f"{os.path.relpath(frame.filename, os.path.dirname(_PKG))}:{frame.lineno}"
        return "outside moepipe"

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def report(self) -> str:
        return "; ".join(f"{n} x{c}" for n, c in sorted(self.calls.items())) or "none"

    def __enter__(self) -> "SyncGuard":
        for name, (owner, attr, counts) in _ENTRY_POINTS.items():
            fn = getattr(owner, attr)
            self._saved.append((owner, attr, fn))
            setattr(owner, attr, self._wrap(name, fn, counts))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()


def test_guard_counts_each_kind_of_synchronisation():
    t = torch.arange(6)
    item = torch.Tensor.item
    with SyncGuard() as guard:
        t.sum().item()
        int(t[0])
        bool(t[1] > 0)
        t[t > 2]
        torch.bincount(t)
        torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=15)  # sized on the host: no read
        t.to(torch.float32)  # a cast moves nothing
        t.to("cpu")
        torch.tensor([1, 2], device="cpu")
        torch.tensor([1, 2])  # stays on the host
    assert guard.total == 8, guard.report()
    assert torch.Tensor.item is item  # restored on exit


CASES = {
    "dropless": dict(),
    "dropless_top1": dict(top_k=1),
    "capped": dict(capacity_factor=1.0),
    "capped_score_norm_after_drop": dict(capacity_factor=0.5, drop_policy="score", normalize_after_drop=True),
    "capped_tutel": dict(capacity_factor=-0.5),
    "shared": dict(num_shared_experts=2, shared_expert_hidden=8),
    "sigmoid_bias_jitter_skew": dict(score_func="sigmoid", bias_update_rate=0.01, router_jitter=0.1),
}


def _cfg(**kw) -> MoEConfig:
    base = dict(num_experts=E, top_k=2, expert_hidden=24, z_loss_coef=0.01)
    base.update(kw)
    return MoEConfig(**base)


def _train_microbatches(layer: MoELayer, xs: list[torch.Tensor]) -> None:
    for x in xs:
        y = layer(x)
        (y * y).sum().backward()


@pytest.mark.parametrize("name", list(CASES))
def test_local_layer_reads_sizes_once_per_microbatch(name):
    torch.manual_seed(0)
    layer = MoELayer(D, _cfg(**CASES[name]))
    layer.train()
    layer.aux_loss_scale = 0.5
    if name.endswith("skew"):
        layer.set_routing_skew(torch.linspace(0, 1, E))
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 8, D, generator=gen, requires_grad=True) for _ in range(2)]
    with SyncGuard() as guard:
        _train_microbatches(layer, xs)
    # one read per layer per microbatch: the expert slice sizes
    assert guard.total == len(xs), guard.report()
    assert all("moepipe/model/moe.py" in site for site in guard.calls), guard.report()
    assert layer.stats.calls == len(xs)

    # the step's statistics stay on the device: recording them reads nothing back
    with SyncGuard() as guard:
        layer.stats.record(_route_once(layer, xs[0]))
    assert guard.total == 0, guard.report()


def test_statistics_are_read_once_per_step():
    torch.manual_seed(0)
    layer = MoELayer(D, _cfg(capacity_factor=0.5))
    for seed in range(3):  # three microbatches
        layer(torch.randn(2, 8, D, generator=torch.Generator().manual_seed(seed)))
    with SyncGuard() as guard:
        host = layer.stats.host()
    assert guard.total == 1, guard.report()
    assert host.demand.dtype == host.kept.dtype == torch.long and host.demand.device.type == "cpu"
    assert host.demand.tolist() == layer.stats.demand.tolist() and host.kept.tolist() == layer.stats.kept.tolist()
    assert host.asked == int(layer.stats.asked) == 3 * 16 * 2 and host.calls == 3
    assert host.aux_loss_sum == float(layer.stats.aux_loss_sum) and host.z_loss_sum == float(layer.stats.z_loss_sum)
    assert int(host.demand.sum() - host.kept.sum()) > 0  # capped: some were dropped


def test_statistics_move_to_the_layers_device_without_a_copy():
    # the meta device stands in for a GPU: counters made on the host start there at the first
    # record as fresh zeros (a host-to-device copy would block), and again after reset()
    stats = MoELayer(D, _cfg()).stats
    counts = torch.ones(E, dtype=torch.long, device="meta")
    loss = torch.zeros((), device="meta")
    for _ in range(2):
        with SyncGuard() as guard:
            stats.add(counts, counts, loss, loss)
            stats.add(counts, counts, loss, loss)
        assert guard.total == 0, guard.report()
        assert {t.device.type for t in (stats.demand, stats.kept, stats.asked, stats.aux_loss_sum, stats.z_loss_sum)} == {"meta"}
        assert stats.calls == 2
        stats.reset()


def _route_once(layer: MoELayer, x: torch.Tensor):
    cfg = layer.cfg
    return route(layer.router.logits(x.reshape(-1, D)).detach(), cfg.top_k, capacity_factor=cfg.capacity_factor)


def test_eval_forward_reads_sizes_once():
    torch.manual_seed(0)
    layer = MoELayer(D, _cfg(capacity_factor=1.0)).eval()
    with torch.no_grad(), SyncGuard() as guard:
        layer(torch.randn(2, 8, D))
    assert guard.total == 1, guard.report()


def _ep_worker(rank: int, world: int, cfg: MoEConfig, holders: list[list[int]], out_dir: str) -> None:
    torch.manual_seed(0)
    layer = MoELayer(D, cfg)
    for key in list(layer.experts.keys()):
        if rank not in holders[int(key)]:
            del layer.experts[key]
    layer.dispatcher = ExpertParallelDispatcher(holders, rank, dist.group.WORLD, E)
    layer.train()
    gen = torch.Generator().manual_seed(10 + rank)
    xs = [torch.randn(2 + rank, 8, D, generator=gen, requires_grad=True) for _ in range(2)]
    _train_microbatches(layer, xs[:1])  # first call: the dispatcher moves its tables to the device once
    with SyncGuard() as guard:
        _train_microbatches(layer, xs)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"total": guard.total, "report": guard.report(), "microbatches": len(xs)}, f)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("capacity_factor", [0.0, 1.0, -0.5])
def test_expert_parallel_layer_reads_sizes_once_per_microbatch(capacity_factor, tmp_path):
    # expert 0 replicated on both ranks, the rest scattered
    holders = [[0, 1], [1], [0], [0], [1], [1], [0], [1]]
    cfg = _cfg(capacity_factor=capacity_factor, num_shared_experts=1)
    run_distributed(_ep_worker, 2, cfg, holders, str(tmp_path), timeout=150)
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            got = json.load(f)
        # one read per layer per microbatch: all send/receive sizes of the all-to-all at once
        assert got["total"] == got["microbatches"], f"rank {rank}: {got['report']}"


if __name__ == "__main__":  # pragma: no cover  (a quick look at the sites: python tests/test_host_sync.py)
    sys.exit(pytest.main([__file__, "-q"]))
