"""fairscale's MOELayer + Top2Gate as an expert backend (a baseline: the GShard algorithm with
fairscale's one-hot dispatch einsums, capacity 2T/E and Gumbel-noised second choice).

What runs is fairscale's: `MOELayer.forward` (dispatch einsum, its all-to-all, experts, combine
einsum) and `top2gating` (choices, capacity, renormalisation, l_aux). What is moepipe's are the
weights and the logits:

- The weights are named exactly like the native layer's (`router.weight`, `experts.<id>.w1/w2/w3`,
  `shared.*`): stage building, initialisation by name, gradient classes (dense/expert),
  checkpoints and live migration need nothing fairscale-specific. fairscale's MOELayer holds
  the same expert modules but is not registered as a submodule, so no weight has two names.
- The logits come from moepipe's `Router` (fp32 with autocast off, the `router_jitter` input
  noise, the injected routing skew); fairscale's `top2gating` turns them into routing. Its
  Top2Gate would compute the logits in the autocast dtype; that is the one deviation.

Native semantics this equals (conf/moe/fairscale.yaml states them; check_config rejects other
values): top_k=2, softmax, capacity_factor=1.0 (2T/E, T divisible by E), drop_policy=position
(first choices queue before second ones, then token order), normalize_weights with
normalize_after_drop (weights renormalised over the surviving choices), aux_loss_type=top1
(fairscale's l_aux counts first choices; mean_e(me*ce) = sum_e(f_e P_e)/E, scaled by E^2 to the
native E*sum_e(f_e P_e)). Honoured on top: z_loss_coef (ST-MoE z-loss of the same logits),
router_jitter, num_shared_experts (one fused SwiGLU beside the routed ones, as in the native
layer), injected routing skew (added to the logits).

Gumbel noise: fairscale picks the second expert as argmax(logits + Gumbel noise), in training
and evaluation alike, with noise drawn from torch's global RNG. It is kept (it is fairscale's
algorithm), so a fairscale run is seeded by train.seed but, unlike native runs, does not give
the same numbers under another parallel layout (ranks draw different noise); tests that
compare layouts patch the noise to zero.

Not supported (rejected by check_config): other top_k/score_func/capacity/drop policy/weight
normalisation/aux-loss type, the aux-loss-free bias (bias_update_rate: fairscale selects on raw
logits), and expert parallelism (parallel.ep>1: fairscale's MOELayer needs every rank to hold
an equal contiguous block of experts and all-to-alls over its whole group; the native backend
does EP). Pipeline and data parallelism work, and so does live migration of whole layers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moepipe.config import ConfigError, MoEConfig
from moepipe.model.layers import SwiGLU
from moepipe.model.moe import AttachAuxLoss
from moepipe.model.routing_stats import RoutingStats
from moepipe.model.router import Router, count_per_expert, router_z_loss


def ensure_process_group() -> None:
    """fairscale's MOELayer asks its group for a world size: give one-process runs a group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class _Unregistered:
    """Holds a module without making it a submodule (so its parameters get no second name)."""

    def __init__(self, module: nn.Module):
        self.module = module


class FairscaleMoE(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        from fairscale.nn.moe import MOELayer

        ensure_process_group()  # distributed workers already have theirs; attach_expert_group picks the group
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.router = Router(d_model, cfg.num_experts, jitter=cfg.router_jitter)
        self.experts = nn.ModuleDict({str(e): SwiGLU(d_model, cfg.expert_hidden) for e in range(cfg.num_experts)})
        shared_hidden = (cfg.shared_expert_hidden or cfg.expert_hidden) * cfg.num_shared_experts
        self.shared = SwiGLU(d_model, shared_hidden) if cfg.num_shared_experts > 0 else None
        # fairscale's layer runs the same expert modules (shared objects: .to(), to_empty() and
        # load_state_dict(assign=True) on this module reach them); the gate is a bound method.
        experts = nn.ModuleList(self.experts[str(e)] for e in range(cfg.num_experts))
        self._fs = _Unregistered(MOELayer(self._gate, experts))
        self._routing: tuple | None = None  # (aux, z) of the forward in progress, handed from the gate
        self.stats = RoutingStats(cfg.num_experts)
        self.record_stats = True
        self.aux_loss_scale = 1.0

    @property
    def moe(self) -> nn.Module:
        """fairscale's MOELayer (its `group` is the EP group after attach_expert_group)."""
        return self._fs.module

    def _gate(self, x: torch.Tensor):
        """Top2Gate's contract (l_aux, combine [T, E, C], dispatch [T, E, C]) on moepipe's logits."""
        import fairscale.nn.moe.top2gate as top2gate

        logits = self.router.logits(x)  # fp32 [T, E], jitter and skew included
        noise: list[torch.Tensor] = []
        draw = top2gate.gumbel_rsample  # looked up per call: a patched sampler (tests) stays in effect

        def recorded(shape, device):  # keep fairscale's own sample: the pre-capacity choices need it
            g = draw(shape, device)
            noise.append(g)
            return g

        top2gate.gumbel_rsample = recorded
        try:
            l_aux, combine, dispatch = top2gate.top2gating(logits)
        finally:
            top2gate.gumbel_rsample = draw
        aux = l_aux * self.num_experts**2  # fairscale's mean_e(me*ce) in native top1 units
        z = router_z_loss(logits)
        if self.record_stats:
            with torch.no_grad():
                # fairscale returns only the kept choices; demand (before capacity) repeats its two
                # argmaxes on the same logits and noise (device ops only: no host read)
                first = torch.softmax(logits, dim=1).argmax(dim=1)
                rest = (logits + noise[0]).scatter(1, first.unsqueeze(1), float("-inf"))
                demand = count_per_expert(torch.cat([first, rest.argmax(dim=1)]), self.num_experts)
                kept = dispatch.sum(dim=(0, 2))
            self.stats.add(demand, kept, aux, z, asked=2 * x.shape[0])
        self._routing = (aux, z)
        return l_aux, combine, dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        # [tokens, 1, d]: MOELayer wants (s, t, m) and asserts tokens divide by its expert count
        out = self.moe(flat.unsqueeze(1)).reshape(flat.shape)
        aux, z = self._routing
        self._routing = None
        if self.shared is not None:
            out = out + self.shared(flat)
        out = out.reshape(shape)
        coef_aux, coef_z = self.cfg.aux_loss_coef, self.cfg.z_loss_coef
        if (coef_aux > 0 or coef_z > 0) and self.training and torch.is_grad_enabled():
            out = AttachAuxLoss.apply(out, (coef_aux * aux + coef_z * z) * self.aux_loss_scale)
        return out

    def update_expert_bias(self, load=None) -> None:  # no selection bias (bias_update_rate is rejected)
        pass

    def set_routing_skew(self, offset: torch.Tensor | None) -> None:
        """An injected [E] logit offset (workload.kind), or None: added to the gate's logits."""
        self.router.skew = None if offset is None else offset.to(self.router.weight.device)

    def attach_expert_group(self, holders, ep_rank: int, ep_group, a2a: str = "flat", local_size: int = 1, node_groups=None) -> None:
        """fairscale all-to-alls over `MOELayer.group`, WORLD by default: under pipeline or data
        parallelism that would exchange tokens with other stages. Use the (size-1) EP group."""
        if dist.get_world_size(ep_group) != 1 or sorted(map(list, holders)) != [[0]] * self.num_experts:
            raise ValueError(f"moe.backend=fairscale holds every expert on one EP rank (parallel.ep=1); got holders {holders}")
        self.moe.group = ep_group
        self.moe.world_size = 1


def _fail(field: str, value, problem: str, fix: str) -> None:
    raise ConfigError(f"{field}={value} {problem}: {fix}")


# field -> the value fairscale's Top2Gate implements (conf/moe/fairscale.yaml states them)
FIXED = {
    "top_k": 2,
    "score_func": "softmax",
    "capacity_factor": 1.0,
    "drop_policy": "position",
    "normalize_weights": True,
    "normalize_after_drop": True,
    "aux_loss_type": "top1",
    "bias_update_rate": 0.0,
}
WHY = {
    "top_k": "but moe.backend=fairscale supports only top-2 gating (fairscale's Top2Gate)",
    "score_func": "but fairscale's Top2Gate scores with a softmax",
    "capacity_factor": "but fairscale's Top2Gate always caps at 2T/E per expert (capacity_factor 1.0 in native terms)",
    "drop_policy": "but fairscale's Top2Gate queues first choices before second ones in token order (drop_policy=position)",
    "normalize_weights": "but fairscale's Top2Gate always renormalises the two weights",
    "normalize_after_drop": "but fairscale's Top2Gate renormalises over the choices that survive the capacity",
    "aux_loss_type": "but fairscale's l_aux counts first choices only (aux_loss_type=top1)",
    "bias_update_rate": "but fairscale's Top2Gate selects on the raw logits (no aux-loss-free selection bias)",
}


def check_config(cfg) -> None:
    """Options moe.backend=fairscale cannot honour: one-line ConfigError (called by config.validate)."""
    e, par, t = cfg.moe, cfg.parallel, cfg.train
    for field, want in FIXED.items():
        got = getattr(e, field)
        if got != want:
            _fail(f"moe.{field}", got, WHY[field], f"set moe.{field}={want} (conf/moe/fairscale.yaml) or use moe.backend=native")
    if par.ep > 1:
        _fail("parallel.ep", par.ep,
              "is not supported by moe.backend=fairscale (its MOELayer needs equal contiguous expert blocks on every rank of one "
              "all-to-all group, which the plans and placers here do not keep)",
              "set parallel.ep=1 (pipeline and data parallelism work) or use moe.backend=native for expert parallelism")
    groups = par.ep * par.dp * cfg.schedule.microbatches
    tokens = (t.batch_size // groups) * t.seq_len if groups and t.batch_size % groups == 0 else None
    if tokens is not None and tokens % e.num_experts:
        _fail("moe.num_experts", e.num_experts,
              f"does not divide the {tokens} tokens of a microbatch (train.batch_size/(ep*dp*microbatches) x train.seq_len), "
              "which fairscale's Top2Gate requires",
              "pick batch_size, seq_len and microbatches whose microbatch token count is a multiple of num_experts")
