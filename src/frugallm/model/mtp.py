"""Multi-token prediction (V3 report, section 2.2).

Module d (1-based) predicts the token d+1 positions ahead. At position i it combines the previous depth's
hidden state h^{d-1}_i (the main model's last hidden state, before its final norm, for d = 1) with the
embedding of token t_{i+d}:
    h' = eh_proj([enorm(Emb(t_{i+d})); hnorm(h^{d-1}_i)])        [B, S, 2H] -> [B, S, H]
    h^d = Block(h')                                              one full transformer block, causal
    logits^d = OutputHead(shared_head.norm(h^d))                 embedding and output head shared
The concatenation order (embedding first) follows the published checkpoint's ``eh_proj``. Checkpoints
store module d as layer index ``num_hidden_layers + d - 1``.
"""

from __future__ import annotations

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.model.block import DecoderLayer
from frugallm.model.layers import Linear, RMSNorm
from frugallm.model.moe import MoEStats


class SharedHead(nn.Module):
    """Holds only the final norm; the output projection is the main model's ``lm_head``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(DecoderLayer):
    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__(cfg, cfg.num_hidden_layers + depth - 1)
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * H, H, bias=False)
        self.shared_head = SharedHead(cfg)

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """The block's input h' from h_prev [B, S, H] and the next tokens' embedding [B, S, H] (docstring above)."""
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # [B, S, H]

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor,  # type: ignore[override]
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, MoEStats | None]:
        return super().forward(self.combine(h_prev, emb_next), rope)
