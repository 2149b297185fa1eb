"""AdamW with DeepSeek-V3's betas and a warmup-stable-decay learning-rate schedule.

Weight decay (0.1) applies to the matrices only: attention and FFN projections, the stacked experts, the
router and the output head. It does not apply to the embedding (a lookup table whose rows are touched only
when their token appears, so decay would shrink rare tokens toward zero), nor to norm gains.
"""

from __future__ import annotations

import torch
from torch import nn

from frugallm.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=_fused_ok(decay + no_decay) or None)


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """The fused AdamW kernel (one pass over each tensor: 12 ms against 43-83 ms for the foreach path on
    12.6M float32 parameters on this 2-core CPU) where every parameter is a plain float tensor on a device
    it supports; sharded (DTensor) parameters keep the foreach path."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(
        not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


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
