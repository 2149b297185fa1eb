"""AdamW with DeepSeek-V3's betas and a warmup-stable-decay learning-rate schedule.

Weight decay (0.1) applies to the matrices only: attention and FFN projections, the stacked experts, the
router and the output head. It does not apply to the embedding (a lookup table whose rows are touched only
when their token appears, so decay would shrink rare tokens toward zero), nor to norm gains.

The two AdamW moments are fp32 by default (torch's fused AdamW). ``adam_moments = "bf16"`` stores them in
bf16, as DeepSeek-V3 does (section 3.3.3), which takes 8 of the 16 bytes per parameter of fp32 training
down to 4: ``AdamWLowPrecisionMoments`` below. Each step upcasts one tensor's moments to fp32, updates them
and the parameter in fp32, and rounds the moments back (round to nearest), so only one tensor's fp32 copy
exists at a time. Round to nearest has one failure: a moment times beta rounds back to itself when 1 - beta
is under half of bf16's relative step (2^-8 at worst), and the moment then never decays. beta2 = 0.999
does that; DeepSeek-V3's 0.95 does not, and ``TrainConfig`` refuses betas at or above 1 - 2^-8.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from frugallm.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        is_matrix = p.dim() >= 2 and "embed_tokens" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.adam_moments == "bf16":
        return AdamWLowPrecisionMoments(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=_fused_ok(decay + no_decay) or None)


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """The fused AdamW kernel (one pass over each tensor: 12 ms against 43-83 ms for the foreach path on
    12.6M float32 parameters on this 2-core CPU) where every parameter is a plain float tensor on a device
    it supports; sharded (DTensor) parameters keep the foreach path."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(
        not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, the update of ``torch.optim.AdamW``) whose
    moments ``exp_avg`` and ``exp_avg_sq`` are stored in ``moment_dtype`` (bf16; fp32 gives torch's AdamW,
    which the tests use to check the arithmetic). Parameters and gradients keep their own dtype."""

    def __init__(self, params: Iterable[Any], *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, moment_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                state["step"] += 1
                t = state["step"].item()
                grad = p.grad.float()
                m = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(m)  # the rounding to moment_dtype; this step uses the fp32 values
                state["exp_avg_sq"].copy_(v)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)  # not in place: v is the state itself in fp32
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1 ** t))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating-point state to each parameter's dtype on load; the moments go back to theirs
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != self.moment_dtype:
                    state[key] = state[key].to(self.moment_dtype)


def wsd_lr(cfg: TrainConfig, step: int, progress: float) -> float:
    """Warmup (linear, by steps), stable at ``lr``, then a linear decay to ``lr * min_lr_ratio`` over the
    last ``decay_fraction`` of the horizon. ``progress`` in [0, 1] is the fraction of the horizon done."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = 1.0 - cfg.decay_fraction
    if progress <= start or cfg.decay_fraction == 0:
        return cfg.lr
    frac = min(1.0, (progress - start) / cfg.decay_fraction)
    return cfg.lr * (1.0 - frac * (1.0 - cfg.min_lr_ratio))
