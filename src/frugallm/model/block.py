"""One pre-norm transformer block: attention (MLA or a baseline) then an FFN (DeepSeekMoE or dense SwiGLU)."""

from __future__ import annotations

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.model.attention import build_attention
from frugallm.model.layers import MLP, RMSNorm
from frugallm.model.moe import MoE, MoEStats


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

    def ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats | None]:
        """The residual FFN half of the block: x [B, S, H] -> x + FFN(norm(x))."""
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            out, stats = self.mlp(h)
            return x + out, stats
        return x + self.mlp(h), None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return self.ffn(x)
