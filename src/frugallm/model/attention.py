"""Multi-head Latent Attention (DeepSeek-V2 section 2.1, V3 section 2.1.1), RoPE with YaRN, and the MHA/GQA
baselines we measure it against.

Symbols (sizes of the published DeepSeek-V3 in brackets):
    B batch, S query length, T key length (cached + new), H hidden [7168], n_h heads [128]
    r_q  q_lora_rank [1536]       query latent; None means a full query projection (V2-Lite)
    r_kv kv_lora_rank [512]       the compressed KV latent, the only per-token state the cache keeps
    d_n  qk_nope_head_dim [128]   per-head key/query part without position
    d_r  qk_rope_head_dim [64]    decoupled RoPE part; one rope key shared by all heads
    d_v  v_head_dim [128]

Weights (nn.Linear stores [out, in]):
    q_a_proj [r_q, H] -> q_a_layernorm -> q_b_proj [n_h*(d_n+d_r), r_q]     (or q_proj [n_h*(d_n+d_r), H])
    kv_a_proj_with_mqa [r_kv + d_r, H] -> split latent c_kv [r_kv] (kv_a_layernorm) and k_rope [d_r]
    kv_b_proj [n_h*(d_n+d_v), r_kv]   expands c_kv into per-head k_nope and v
    o_proj [H, n_h*d_v]

Expanded path (training, prefill), the one implemented by ``forward``:
    q = [q_nope, rope(q_rope)]                                  [B, n_h, S, d_n+d_r]
    k = [W_UK c_kv, rope(k_rope) broadcast over heads]          [B, n_h, T, d_n+d_r]
    v = W_UV c_kv                                               [B, n_h, T, d_v]
    out = o_proj(softmax(q k^T * scale) v)
The absorbed decode path (serving) multiplies W_UK into the query and applies W_UV after attention, so
attention runs directly over the cached [r_kv + d_r] per token; ``kv_b_weights`` exposes W_UK and W_UV.

RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... as DeepSeek's checkpoints lay them out, or, with
``rope_interleave=False``, the pairs (x_i, x_{i + d_r/2}) of the two halves (transformers' ``rotate_half``).
Only the layout of q_rope and k_rope differs, and both are rotated alike, so the cached k_rope and the
absorbed decode work unchanged in either. Frequencies: plain, ``linear`` (divided by the factor), ``llama3``
(long wavelengths divided by the factor, a smooth blend between), and YaRN (arXiv 2309.00071), which blends
interpolated and extrapolated frequencies and corrects the softmax scale by ``mscale(factor,
mscale_all_dim)**2``; the formulas are transformers' (``modeling_rope_utils``), so that a checkpoint loads
to the same numbers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from frugallm.config import ModelConfig
from frugallm.kernels import KernelPolicy
from frugallm.kernels.attention import SegmentMask, causal_attention
from frugallm.model.layers import Linear, RMSNorm, project_together


# ----- rotary embedding ---------------------------------------------------------------------------------
def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_type(scaling: dict[str, Any] | None) -> str:
    return (scaling or {}).get("type", (scaling or {}).get("rope_type")) or "default"


def rope_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor applied to cos/sin (1 but for YaRN)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim  # never on meta
    inv_freq = 1.0 / theta**exponents  # [dim/2]
    kind = _rope_type(scaling)
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0  # type: ignore[index]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling), 1.0  # type: ignore[arg-type]
    if kind != "yarn":
        return inv_freq, 1.0
    assert scaling is not None
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if scaling.get("attention_factor") is not None:
        attn_factor = float(scaling["attention_factor"])
    elif mscale and mscale_all:
        attn_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
        attn_factor = _yarn_mscale(factor)

    def dim_for_rotations(n_rot: float) -> float:
        # the pair index whose wavelength completes n_rot turns over the original context
        return dim * math.log(original / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if scaling.get("truncate", True):  # transformers' default; False keeps the fractional bounds
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high-frequency pairs keep their frequency), 0: interpolate
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    return inv_freq, attn_factor


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths above original/low_freq_factor are divided by the factor, those below
    original/high_freq_factor kept, and those between blended linearly in original/wavelength."""
    factor, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq  # [dim/2]
    scaled = torch.where(wavelength > original / lo, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / hi) & (wavelength <= original / lo)
    return torch.where(medium, blended, scaled)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if _rope_type(rs) != "default" and rs.get("mscale_all_dim"):  # type: ignore[union-attr]
        m = _yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale *= m * m
    return scale


class RopeTable(NamedTuple):
    """What ``apply_rope`` needs besides x: cos and sin [B or 1, S, d_r/2] and the pairs' layout (per row, B,
    where positions differ between rows: packed examples restart at 0, serving rows start where they are)."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleaved: bool = True


class Rotary(nn.Module):
    """Caches cos/sin per position; ``forward(positions)`` returns a ``RopeTable`` of [*positions, d_r/2]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # a plain attribute, not a buffer: it stays float32 when the model is cast to bf16
        self.inv_freq, self.attn_factor = rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta,
                                                           cfg.rope_scaling)
        self.interleaved = cfg.rope_interleave

    def forward(self, positions: torch.Tensor) -> RopeTable:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [*, d_r/2]
        return RopeTable(angles.cos() * self.attn_factor, angles.sin() * self.attn_factor, self.interleaved)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate pairs of the last dim, interleaved (x0, x1), (x2, x3) ... or the halves' (x_i, x_{i + d_r/2}).
    x: [B, heads, S, d_r]; cos/sin: [B or 1, S, d_r/2]."""
    up = x.to(torch.promote_types(x.dtype, torch.float32))  # rotate in at least float32
    if not interleaved:
        x1, x2 = up.chunk(2, dim=-1)  # [B, h, S, d_r/2] each
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, d_r/2]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
    if up.dtype == torch.float32:
        # pairs as complex numbers times cos + i sin: one complex multiply, forward and backward (half the
        # time of the real-valued unbind/stack form below, same values)
        pairs = up.unflatten(-1, (-1, 2))  # [B, h, S, d_r/2, 2]
        if pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()
        rot = torch.view_as_complex(pairs) * torch.complex(cos, sin).unsqueeze(1)  # [B, h, S, d_r/2]
        return torch.view_as_real(rot).flatten(-2).to(x.dtype)
    x1, x2 = up.unflatten(-1, (-1, 2)).unbind(-1)  # [B, h, S, d_r/2] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, d_r/2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # [B, h, S, d_r/2, 2]
    return out.flatten(-2).to(x.dtype)


# ----- MLA ------------------------------------------------------------------------------------------------
# The query and KV latents' norms use 1e-6 whatever rms_norm_eps says: so do DeepSeek's own inference code and
# transformers' DeepseekV2/V3 (their RMSNorm default), which a checkpoint with rms_norm_eps 1e-5 (Moonlight)
# must reproduce.
LATENT_NORM_EPS = 1e-6

class MLA(nn.Module):
    kernels = KernelPolicy()  # which attention kernel runs (``frugallm.kernels``); build_model sets the model's

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.d_nope, self.d_rope, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = softmax_scale(cfg)
        H, nh, dqk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(H, nh * dqk, bias=False)
        else:
            self.q_a_proj = Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, nh * dqk, bias=False)
        self.kv_a_proj_with_mqa = Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = Linear(nh * cfg.v_head_dim, H, bias=False)

    def project_q(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                  q_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> q_nope [B, n_h, S, d_n], q_rope [B, n_h, S, d_r] (rotated). ``q_in``: the first
        query projection of x (q_a_proj's latent, or q_proj's output) where ``forward`` computed it."""
        first = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        q = first(x) if q_in is None else q_in
        if hasattr(self, "q_a_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # [B, n_h, S, d_n+d_r]
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        return q_nope, apply_rope(q_rope, *rope)

    def compress_kv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                    kv_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> kv_latent [B, S, r_kv] (normalised), k_rope [B, S, d_r] (rotated): what a cache keeps.
        ``kv_in``: kv_a_proj_with_mqa(x) [B, S, r_kv + d_r] where ``forward`` computed it."""
        kv = self.kv_a_proj_with_mqa(x) if kv_in is None else kv_in
        kv_latent, k_rope = kv.split([self.kv_rank, self.d_rope], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(1), *rope).squeeze(1)  # [B, S, d_r]
        return self.kv_a_layernorm(kv_latent), k_rope

    def kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [n_h, d_n, r_kv] and W_UV [n_h, d_v, r_kv], views of kv_b_proj for the absorbed path."""
        w = self.kv_b_proj.weight.unflatten(0, (self.n_heads, self.d_nope + self.d_v))  # [n_h, d_n+d_v, r_kv]
        return w[:, : self.d_nope], w[:, self.d_nope :]

    def expand_kv(self, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head K [B, n_h, T, d_n+d_r] and V [B, n_h, T, d_v] rebuilt from the latent and the rope key."""
        kv = self.kv_b_proj(kv_latent).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # [B, n_h, T, d_n+d_v]
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k_rope = k_rope.unsqueeze(1).expand(-1, self.n_heads, -1, -1)  # [B, n_h, T, d_r]
        return torch.cat([k_nope, k_rope], dim=-1), v

    def attend_expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor,
                        k_rope: torch.Tensor, q_offset: int = 0, segments: SegmentMask | None = None
                        ) -> torch.Tensor:
        """Rebuild per-head K and V from the latent and attend (within ``segments`` for packed rows).
        Returns [B, S, n_h*d_v]."""
        k, v = self.expand_kv(kv_latent, k_rope)
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, n_h, S, d_n+d_r]
        out = causal_attention(q, k, v, self.scale, self.kernels, q_offset, segments)  # [B, n_h, S, d_v]
        return out.transpose(1, 2).flatten(2)  # [B, S, n_h*d_v]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                segments: SegmentMask | None = None) -> torch.Tensor:
        # the first query projection and the KV compression both read x: one fused projection where the
        # modules provide one (LoRA's, ``project_together``), so the backward has one input gradient for
        # both; plain linears stay apart (the memory model counts no concatenated attention weights)
        first = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        q_in = kv_in = None
        both = project_together(x, first, self.kv_a_proj_with_mqa, plain=False)  # [B, S, N_q+r_kv+d_r] or None
        if both is not None:
            q_in, kv_in = both.split([first.out_features, self.kv_rank + self.d_rope], dim=-1)
        q_nope, q_rope = self.project_q(x, rope, q_in)
        kv_latent, k_rope = self.compress_kv(x, rope, kv_in)
        return self.o_proj(self.attend_expanded(q_nope, q_rope, kv_latent, k_rope, segments=segments))


# ----- baselines ----------------------------------------------------------------------------------------
class GQA(nn.Module):
    """Multi-head (n_kv = n_h) or grouped-query attention with the same head dims as MLA; RoPE rotates the
    last d_r dims of every query and key head. The KV cache keeps n_kv*(d_n+d_r+d_v) values per token."""

    kernels = KernelPolicy()

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, nh, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads
        self.n_heads, self.n_kv = nh, nkv
        self.d_nope, self.d_rope, self.d_qk, self.d_v = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                          cfg.qk_head_dim, cfg.v_head_dim)
        self.scale = softmax_scale(cfg)
        self.q_proj = Linear(H, nh * self.d_qk, bias=False)
        self.k_proj = Linear(H, nkv * self.d_qk, bias=False)
        self.v_proj = Linear(H, nkv * self.d_v, bias=False)
        self.o_proj = Linear(nh * self.d_v, H, bias=False)

    def _rope_last(self, t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nope, r = t.split([self.d_nope, self.d_rope], dim=-1)
        return torch.cat([nope, apply_rope(r, *rope)], dim=-1)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q_proj(x).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # [B, n_h, S, d_qk]
        k = self.k_proj(x).unflatten(-1, (self.n_kv, -1)).transpose(1, 2)  # [B, n_kv, S, d_qk]
        v = self.v_proj(x).unflatten(-1, (self.n_kv, -1)).transpose(1, 2)  # [B, n_kv, S, d_v]
        return self._rope_last(q, rope), self._rope_last(k, rope), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0,
               segments: SegmentMask | None = None) -> torch.Tensor:
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, n_h, T, *]
        out = causal_attention(q, k, v, self.scale, self.kernels, q_offset, segments)  # [B, n_h, S, d_v]
        return out.transpose(1, 2).flatten(2)  # [B, S, n_h*d_v]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                segments: SegmentMask | None = None) -> torch.Tensor:
        return self.o_proj(self.attend(*self.qkv(x, rope), segments=segments))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attention == "mla" else GQA(cfg)
