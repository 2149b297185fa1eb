"""Multi-token prediction (V3 report, section 2.2).

Module d (1-based) predicts the token d+1 positions ahead. At position i it combines the previous depth's
hidden state h^{d-1}_i (the main model's last hidden state, before its final norm, for d = 1) with the
embedding of token t_{i+d}:
    h' = eh_proj([enorm(Emb(t_{i+d})); hnorm(h^{d-1}_i)])        [B, S, 2H] -> [B, S, H]
    h^d = Block(h')                                              one full transformer block, causal
    logits^d = OutputHead(shared_head.norm(h^d))                 embedding and output head shared
The concatenation order (embedding first) follows the published checkpoint's ``eh_proj``. Checkpoints
store module d as layer index ``num_hidden_layers + d - 1``.

Packed rows (``frugallm.tune.sft``): depth d at position t reads token t+d and is trained on labels[t+d]
(labels already shifted by one), so t is a valid position at depth d only when t+d lies in the same example
(``within_segment``). Elsewhere its input is whatever token sits d further on and its label is ignored; no
valid position attends to such a one, since a segment is contiguous: s <= t valid, same segment, gives
s + d <= t + d inside it. So MTP losses never cross examples either.
"""

from __future__ import annotations

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.kernels.attention import SegmentMask
from frugallm.model.block import DecoderLayer
from frugallm.model.layers import Linear, RMSNorm
from frugallm.model.moe import MoEStats, TokenGroups


def within_segment(segment_ids: torch.Tensor, depth: int) -> torch.Tensor:
    """segment_ids [B, S] -> [B, S] True where position t + depth exists and is in t's segment (not padding)."""
    ahead = torch.zeros_like(segment_ids)  # [B, S], 0 (padding) past the end
    ahead[:, : segment_ids.shape[1] - depth] = segment_ids[:, depth:]
    return (ahead == segment_ids) & (segment_ids != 0)


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
                rope: tuple[torch.Tensor, torch.Tensor], segments: SegmentMask | None = None,
                groups: TokenGroups | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        return super().forward(self.combine(h_prev, emb_next), rope, segments, groups)
