"""AdamW with decoupled weight decay on matrices only, and warmup + cosine learning rate."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from moepipe.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # Norm gains and other vectors are not decayed (decay would pull gains towards zero).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for group in groups for g in _by_tensor_kind(group)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def _by_tensor_kind(group: dict) -> list[dict]:
    """Tensor parallelism: DTensor (TP-sharded) and plain parameters in separate groups with the
    same settings, because AdamW's foreach kernels take no list mixing the two."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in group["params"] if isinstance(p, DTensor)]
    if not sharded:
        return [group]
    plain = [p for p in group["params"] if not isinstance(p, DTensor)]
    return [dict(group, params=sharded), dict(group, params=plain)]


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for the update made at 0-based `step`: linear warmup, cosine decay to min."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _payload(p: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding a parameter's values: the parameter itself, or a TP-sharded
    (DTensor) parameter's local shard. A DTensor keeps its shard as a Python attribute, so
    rebinding the DTensor's own `.data` would not reach what its kernels read, and a
    parameter's `to_local()` is a fresh view: the weight versions rebind the `.data` of the
    shard object itself, which autograd's saved DTensor reads again in backward."""
    from torch.distributed.tensor import DTensor

    return p._local_tensor if isinstance(p, DTensor) else p


class WeightStash:
    """PipeDream-2BW's delayed update with two weight versions (Narayanan et al., 2021):
    W(t+1) = W(t) - lr * update(grad f_t(W(t-1))), W(-1) = W(0).

    Step t computes its gradient with the stashed previous version W(t-1) (forward and backward
    alike: `compute()` swaps it in, `restore()` swaps W(t) back), and the optimizer applies that
    gradient to W(t) (`before_update()` first stashes W(t) as the next step's compute version).
    The versions are exchanged by rebinding `.data`, so no copy is made on the way in or out and
    the optimizer's state stays keyed by the same parameters; memory holds two versions. Used by
    the single-process reference and the distributed trainer alike, so both apply one rule."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.prev: list[torch.Tensor] | None = None  # W(t-1); None before the first update (W(-1) = W(0))
        self._live: list[torch.Tensor] | None = None

    def compute(self) -> None:
        if self.prev is None:
            return
        self._live = [_payload(p).data for p in self.params]
        for p, w in zip(self.params, self.prev):
            _payload(p).data = w

    def restore(self) -> None:
        if self._live is None:
            return
        for p, w in zip(self.params, self._live):
            _payload(p).data = w
        self._live = None

    @torch.no_grad()
    def before_update(self) -> None:
        """W(t) becomes the stashed version; the optimizer then turns the live one into W(t+1)."""
        if self.prev is None:
            self.prev = [_payload(p).detach().clone() for p in self.params]
        else:
            for w, p in zip(self.prev, self.params):
                w.copy_(_payload(p))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.prev is None else {f"stash.{i}": w for i, w in enumerate(self.prev)}


def delayed_update(schedule_name: str) -> bool:
    """Whether the schedule computes step t's gradient with W(t-1) (two weight versions, as
    PipeDream-2BW's order function declares)."""
    from moepipe.sim.schedules import order_traits

    return order_traits(schedule_name)[0] == 2


class VersionedWeights:
    """PipeDream-2BW without a flush (the distributed runtime's half of the delayed rule):
    W(k) lives in buffer k % 2, batch b computes with W(b-1) (W(-1) = W(0)), and while batch
    b+1's forwards run, batch b's last backwards still need W(b-1).

    `bind(v)` points every parameter at buffer v (`.data` rebinding: autograd saved the
    parameter itself, so a backward must see the buffer its forward saw; the executor binds
    before every compute action). `take_grads(b)` moves batch b's completed gradient aside
    (the next batch accumulates into .grad meanwhile). `update(b)` is the context in which the
    caller syncs, clips and steps: on entry W(b) is copied into buffer (b+1) % 2 (it held
    W(b-1), whose last user, batch b, is done), bound, and given batch b's gradient; the
    optimizer's in-place step then makes W(b+1) there. Its in-place writes bump the
    parameters' version counters, which autograd would read as a modification of what batch
    b+1 saved (it saved the parameter while bound to the other buffer, untouched): the
    counters are restored on exit."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.bufs = [[_payload(p).data for p in self.params], [_payload(p).detach().clone() for p in self.params]]
        self.bound = 0
        self.ready: dict[int, list] = {}

    def bind(self, version: int) -> None:
        if version != self.bound:
            for p, w in zip(self.params, self.bufs[version]):
                _payload(p).data = w
            self.bound = version

    def take_grads(self, batch: int) -> None:
        self.ready[batch] = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    @contextlib.contextmanager
    def update(self, batch: int):
        grads = self.ready.pop(batch)
        current = [p.grad for p in self.params]
        dst, src = (batch + 1) % 2, batch % 2
        with torch.no_grad():
            for d, s in zip(self.bufs[dst], self.bufs[src]):
                d.copy_(s)
        self.bind(dst)
        versions = [p._version for p in self.params]
        for p, g in zip(self.params, grads):
            p.grad = g
        try:
            yield
        finally:
            torch._C._autograd._unsafe_set_version_counter(self.params, versions)
            for p, g in zip(self.params, current):
                p.grad = g

    def latest(self, batch: int) -> None:
        """Bind W(batch + 1), the newest version after batch's update (evaluation, checkpoints)."""
        self.bind((batch + 1) % 2)
