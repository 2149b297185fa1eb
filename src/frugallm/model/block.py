"""One pre-norm transformer block: attention (MLA or a baseline) then an FFN (DeepSeekMoE or dense SwiGLU).

The two residual halves are methods of their own, ``attention`` and ``ffn``, so that the serving runner
(``frugallm.serve.runner``) runs the same block with attention over its paged cache instead of over x alone.
Packed training rows pass ``segments`` (attention stays within each example) and ``groups`` (the tokens the
MoE's balance statistics count, per example); both None is the plain causal block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.kernels.attention import SegmentMask
from frugallm.model.attention import RopeTable, build_attention
from frugallm.model.layers import MLP, RMSNorm
from frugallm.model.moe import MoE, MoEStats, TokenGroups

# (the block, its normalised input [B, S, H], rope) -> the attention output after o_proj [B, S, H]
Attend = Callable[["DecoderLayer", torch.Tensor, RopeTable], torch.Tensor]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size,
                                                                             cfg.intermediate_size)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def attention(self, x: torch.Tensor, rope: RopeTable, attend: Attend | None = None,
                  segments: SegmentMask | None = None) -> torch.Tensor:
        """The residual attention half of the block: x [B, S, H] -> x + Attn(norm(x)). Without ``attend`` the
        module's own causal attention over x alone, within ``segments`` where given; the serving runner passes
        an ``attend`` that also reads and writes the cache of earlier tokens (and masks its own rows)."""
        if attend is not None and segments is not None:
            raise ValueError("segments mask the block's own attention; an attend hook does its own masking")
        h = self.input_layernorm(x)
        return x + (self.self_attn(h, rope, segments) if attend is None else attend(self, h, rope))

    def ffn(self, x: torch.Tensor, groups: TokenGroups | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        """The residual FFN half of the block: x [B, S, H] -> x + FFN(norm(x)); ``groups``: the MoE's
        balance statistics over these sequences instead of the batch rows."""
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, stats = self.mlp(h, groups)
            return x + out, stats
        return x + self.mlp(h), None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                segments: SegmentMask | None = None, groups: TokenGroups | None = None
                ) -> tuple[torch.Tensor, MoEStats | None]:
        return self.ffn(self.attention(x, rope, segments=segments), groups)
