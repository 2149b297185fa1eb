"""GRPO's objective (DeepSeekMath, arXiv 2402.03300, section 4.1; used for DeepSeek-R1, arXiv 2501.12948),
with the published fixes as options.

Symbols: P prompts per step, G samples per prompt (a group), B = P * G sequences, T completion tokens (padded),
r_{p,g} a sample's reward, o_{i,t} token t of sequence i, pi the policy being trained, pi_old the policy that
sampled (the weights at rollout time), pi_ref the frozen reference.

    advantage   A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token of sequence i;
                ``scale_std=False`` keeps only the centring (Dr. GRPO, arXiv 2503.20783, argues the division
                weights easy and hard questions unequally). No critic: the group's mean is the baseline.
    ratio       rho_{i,t} = pi(o_{i,t} | ...) / pi_old(o_{i,t} | ...), clipped to [1 - eps_low, 1 + eps_high];
                eps_high > eps_low is DAPO's clip-higher (arXiv 2503.14476, 0.28 against 0.2)
    surrogate   L_{i,t} = -min(rho A, clip(rho) A)
    KL          k3 estimator (Schulman, "Approximating KL divergence", 2020) of KL(pi || pi_ref), unbiased under
                samples from pi: k3 = exp(q) - q - 1 with q = log pi_ref - log pi, always >= 0; added as
                beta * k3 per token (R1: beta = 0.001). beta = 0 keeps no reference at all.
    aggregation how per-token terms become one loss (``AGGREGATIONS``):
        seq-mean    mean over each sequence's tokens, then over sequences (the GRPO paper's 1/G sum 1/|o_i| sum)
        token-mean  sum over all tokens of the batch / their number (DAPO): long answers are not down-weighted
        dr-grpo     sum over all tokens / (B * max_new_tokens), a constant (Dr. GRPO): no length normaliser
    The default is token-mean.

A group whose rewards are all equal has A = 0 for every sample: it carries no gradient (its surrogate and
its ratio's gradient vanish; only the KL term would act), so the trainer drops such groups before the
forward and counts them (``informative_groups``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugallm.errors import ConfigError

AGGREGATIONS = ("token-mean", "seq-mean", "dr-grpo")


@dataclass(kw_only=True)
class GRPOLossConfig:
    clip_low: float = 0.2  # eps_low
    clip_high: float = 0.2  # eps_high; 0.28 is DAPO's clip-higher
    kl_coef: float = 0.0  # beta; R1 used 0.001. 0: no reference model
    aggregation: str = "token-mean"
    scale_std: bool = True  # divide the centred rewards by the group's standard deviation
    max_new_tokens: int = 64  # dr-grpo's constant normaliser

    def __post_init__(self) -> None:
        if not 0 < self.clip_low < 1:
            raise ConfigError(f"clip_low must be in (0, 1), got {self.clip_low!r}")
        if not self.clip_high > 0:
            raise ConfigError(f"clip_high must be > 0, got {self.clip_high!r}")
        if not self.kl_coef >= 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}")


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: centred on the group's mean, divided by its (unbiased) standard
    deviation + eps when ``scale_std``. A group of one sample has no baseline: advantage 0."""
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    std = rewards.std(dim=1, keepdim=True)
    # an all-equal group is exactly 0 (not 0/0 when eps is 0)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: groups whose rewards are not all equal (the others carry no signal)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from log pi and log pi_ref of sampled tokens (>= 0)."""
    q = ref_logp - logp
    return torch.exp(q) - q - 1


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar, to backward
    clip_fraction: float  # share of tokens whose ratio was clipped (where clipping changed the term)
    kl: float  # mean k3 per token (0 without a reference)
    ratio_mean: float


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cfg: GRPOLossConfig, ref_logp: torch.Tensor | None = None, *, n_tokens: float | None = None,
                n_seqs: int | None = None) -> LossParts:
    """logp, old_logp, ref_logp, mask [B, T] (mask 1 on completion tokens), advantages [B] -> GRPO's loss
    (module doc) and its diagnostics. ``n_tokens``/``n_seqs``: the whole batch's counts when this is one
    micro-batch of it, so that the micro-batches' losses sum to the batch's."""
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)[:, None]  # [B, 1]
    ratio = torch.exp(logp - old_logp)  # [B, T]
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # [B, T]
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs the reference log-probabilities")
        kl_tok = k3(logp, ref_logp)
        per_token = per_token + cfg.kl_coef * kl_tok
        kl = (kl_tok * mask).sum() / mask.sum().clamp_min(1)
    loss = aggregate(per_token, mask, cfg, n_tokens=n_tokens, n_seqs=n_seqs)
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        was_clipped = ((ratio * adv) > (clipped * adv)).to(mask.dtype)  # min took the clipped term
        clip_fraction = float((was_clipped * mask).sum() / n)
        ratio_mean = float((ratio * mask).sum() / n)
    return LossParts(loss, clip_fraction, float(kl.detach()), ratio_mean)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, cfg: GRPOLossConfig, *, n_tokens: float | None = None,
              n_seqs: int | None = None) -> torch.Tensor:
    """per_token, mask [B, T] -> the scalar loss by ``cfg.aggregation`` (module doc); ``n_tokens``/``n_seqs``
    the batch's completion tokens and sequences (default: this tensor's)."""
    masked = per_token * mask
    seqs = n_seqs if n_seqs is not None else per_token.shape[0]
    if cfg.aggregation == "seq-mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum() / seqs
    if cfg.aggregation == "token-mean":
        return masked.sum() / (n_tokens if n_tokens is not None else mask.sum().clamp_min(1))
    return masked.sum() / (seqs * cfg.max_new_tokens)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> log softmax(logits)[target] [B, T] in float32, one V-row at a time
    through logsumexp (no [B, T, V] log-probability copy)."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)


__all__ = ["AGGREGATIONS", "GRPOLossConfig", "LossParts", "aggregate", "group_advantages", "informative_groups",
           "k3", "policy_loss", "token_logprobs"]
