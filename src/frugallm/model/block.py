"""One pre-norm transformer block: attention (MLA or a baseline) then an FFN (DeepSeekMoE or dense SwiGLU).

The two residual halves are methods of their own, ``attention`` and ``ffn``, so that the serving runner
(``frugallm.serve.runner``) runs the same block with attention over its paged cache instead of over x alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.model.attention import RopeTable, build_attention
from frugallm.model.layers import MLP, RMSNorm
from frugallm.model.moe import MoE, MoEStats

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

    def attention(self, x: torch.Tensor, rope: RopeTable, attend: Attend | None = None) -> torch.Tensor:
        """The residual attention half of the block: x [B, S, H] -> x + Attn(norm(x)). Without ``attend`` the
        module's own causal attention over x alone; the serving runner passes one that also reads and writes
        the cache of earlier tokens."""
        h = self.input_layernorm(x)
        return x + (self.self_attn(h, rope) if attend is None else attend(self, h, rope))

    def ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        """The residual FFN half of the block: x [B, S, H] -> x + FFN(norm(x))."""
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, stats = self.mlp(h)
            return x + out, stats
        return x + self.mlp(h), None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, MoEStats | None]:
        return self.ffn(self.attention(x, rope))
