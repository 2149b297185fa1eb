"""The FP8 linear and the FP8 routed experts: autograd functions whose three GEMMs take e4m3 operands, and
the modules that ``convert_to_fp8`` puts in place of ``nn.Linear`` and ``GroupedExperts``.

Symbols: M tokens (rows of the flattened input), K in_features, N out_features, E experts, t the tile (128).

One linear y = x W^T, with x [M, K] and the FP32 master weight W [N, K]:
    forward   y  = gemm(x  in 1 x t tiles along K,  W   in t x t blocks)                  [M, N]
    dgrad     dx = gemm(dy in 1 x t tiles along N,  W^T in t x t blocks)                  [M, K]
    wgrad     dW = gemm(dy^T in 1 x t tiles along M, x^T in 1 x t tiles along M)          [N, K]
Every operand is quantized along the dim its GEMM contracts, so a tile's scale factors out of the partial
sum over that tile. W^T's blocks are W's blocks transposed (no requantization); x and dy are quantized a
second time along M for the weight gradient (DeepSeek's 128x1 tiles, section 3.5.2 of the V3 report).
W is quantized once per forward from the master weight and its e4m3 blocks are kept for the input
gradient (1 byte per weight element until the backward, as Transformer Engine keeps its FP8 weight copy);
with few tokens per expert, quantizing the stacked expert weights costs more than the GEMMs themselves.

Saved for backward: the weight (a reference), its e4m3 blocks (unless ``cache_weights`` is off: the backward
then quantizes the weight again, to the same blocks), and x in the compute dtype (a bf16 copy
under bf16 autocast, as an autocast ``nn.Linear`` keeps; a reference otherwise). With ``fp8_saved_activations``, x is instead
kept as the e4m3 operand of the weight gradient, x^T in 1 x t tiles along M (1 + 4/t bytes per element),
quantized once in the forward; the report caches Linear inputs in FP8 the same way. Quantizing along M
right away, rather than saving the forward's tiles along K and requantizing them in the backward,
rounds x once instead of twice at the same memory.

Output dtype: the autocast dtype when autocast is on, else the input's; dx in the input's dtype; dW in the
master weight's dtype (FP32). Autocast is switched off inside, since the GEMMs decide their own precision.

The routed experts run the same three GEMMs per expert on the expert's contiguous slice of the sorted
tokens (``GroupedExperts.run_sorted``). Token tiles for the weight gradient start at each expert's first
token, since each expert's dW is its own GEMM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from frugallm.model.moe import ExpertGroups, GroupedExperts
from frugallm.precision.backends import Fp8Backend, select_backend
from frugallm.precision.quant import E4M3, Fp8Tensor, quantize
from frugallm.precision.recipe import Fp8Recipe


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _segments(n: int, sizes: list[int] | None) -> list[tuple[int, int, int]]:
    """(expert, start, end) of each non-empty group of rows; (0, 0, n) for a plain linear."""
    if sizes is None:
        return [(0, 0, n)]
    out, start = [], 0
    for expert, m in enumerate(sizes):
        if m:
            out.append((expert, start, start + m))
        start += m
    if start != n:
        raise ValueError(f"expert sizes sum to {start}, not to the {n} rows")
    return out


class _Fp8GemmFn(torch.autograd.Function):
    """y = x W^T with FP8 operands: a plain linear (sizes None, weight [N, K]) or routed experts (sizes[e]
    consecutive rows of x for expert e, weight [E, N, K])."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, sizes: list[int] | None,  # type: ignore[override]
                recipe: Fp8Recipe, backend: Fp8Backend, out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K] -> [M, N]."""
        t, b, pow2 = recipe.tile, recipe.block, recipe.pow2_scales
        xq = quantize(x, (1, t), pow2)  # [M, K] tiles along K
        wq = quantize(weight, (b, b), pow2)  # [(E,) N, K] blocks
        ctx.recipe, ctx.backend, ctx.sizes, ctx.x_dtype = recipe, backend, sizes, x.dtype
        ctx.cache_weights = recipe.cache_weights
        w_saved = (wq.data, wq.scale) if recipe.cache_weights else ()
        if recipe.fp8_saved_activations:  # x^T for the weight gradient, tiled along each segment's tokens
            segments = _segments(x.shape[0], sizes)
            parts = [quantize(x[s:e].t(), (1, t), pow2) for _, s, e in segments]  # [K, m_e] each
            data = torch.cat([p.data.view(torch.uint8) for p in parts], dim=1).view(E4M3)  # [K, M]
            scale = torch.cat([p.scale for p in parts], dim=1)  # [K, sum of ceil(m_e / t)]
            ctx.save_for_backward(weight, *w_saved, data, scale)
        else:
            ctx.save_for_backward(weight, *w_saved, x.to(out_dtype))  # x: what autocast keeps
        if sizes is None:
            return backend.gemm_nt(xq, wq, out_dtype, fixed_shape=True)
        return backend.grouped_gemm_nt(xq, wq, sizes, out_dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        recipe, backend, sizes = ctx.recipe, ctx.backend, ctx.sizes
        t, b, pow2 = recipe.tile, recipe.block, recipe.pow2_scales
        if ctx.cache_weights:
            weight, w_data, w_scale, *saved = ctx.saved_tensors
        else:
            weight, *saved = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq = quantize(dy, (1, t), pow2)  # [M, N] tiles along N
            wq = Fp8Tensor(w_data, w_scale, (b, b)) if ctx.cache_weights else quantize(weight, (b, b), pow2)
            wtq = wq.t()  # W^T [(E,) K, N]: the forward's blocks, transposed
            if sizes is None:
                dx = backend.gemm_nt(dyq, wtq, ctx.x_dtype, fixed_shape=True)  # [M, K]
            else:
                dx = backend.grouped_gemm_nt(dyq, wtq, sizes, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # an expert without tokens gets a zero gradient; a plain linear's single segment assigns dw
            dw = weight.new_zeros(weight.shape) if sizes is not None else None
            tile0 = 0
            for expert, s, e in _segments(dy.shape[0], sizes):
                dyt = quantize(dy[s:e].t(), (1, t), pow2)  # [N, m_e] tiles along this segment's tokens
                if recipe.fp8_saved_activations:
                    n_tiles = -(-(e - s) // t)
                    xt = Fp8Tensor(saved[0][:, s:e], saved[1][:, tile0 : tile0 + n_tiles], (1, t))  # [K, m_e]
                    tile0 += n_tiles
                else:
                    xt = quantize(saved[0][s:e].t(), (1, t), pow2)  # [K, m_e]
                grad = backend.gemm_nt(dyt, xt, weight.dtype, fixed_shape=sizes is None)  # [N, K]
                if dw is None:
                    dw = grad
                else:
                    dw[expert] = grad
        return dx, dw, None, None, None, None


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8 (the module doc). Same parameters, same names, same
    state_dict: checkpoints do not know whether a model was trained converted."""

    recipe: Fp8Recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe) -> Fp8Linear:
        with torch.device("meta"):  # allocate nothing: the parameters are taken over below
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.recipe = recipe
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, K = x.shape
        out_dtype = _out_dtype(x)
        if x.numel() == 0:
            return x.new_zeros(*lead, self.out_features, dtype=out_dtype)
        backend = select_backend(self.recipe.backend, x.device, self.recipe.tile, self.recipe.block)
        y = _Fp8GemmFn.apply(x.reshape(-1, K), self.weight, None, self.recipe, backend, out_dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)  # [*, N]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.recipe.describe()}"


class Fp8GroupedExperts(GroupedExperts):
    """``GroupedExperts`` whose ``project`` runs the expert GEMMs in FP8; the SwiGLU between them stays
    in the activation dtype. Same stacked parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)."""

    recipe: Fp8Recipe

    @classmethod
    def from_experts(cls, experts: GroupedExperts, recipe: Fp8Recipe) -> Fp8GroupedExperts:
        with torch.device("meta"):
            new = cls(experts.n_experts, experts.gate_up_proj.shape[-1], experts.intermediate)
        new.gate_up_proj = experts.gate_up_proj
        new.down_proj = experts.down_proj
        new.kernels = experts.kernels
        new.recipe = recipe
        return new

    def compute_dtype(self, xs: torch.Tensor) -> torch.dtype:
        return xs.dtype  # the GEMMs quantize their operands themselves; no cast to the autocast dtype first

    def group(self, xs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ExpertGroups]:
        # one host sync, as the unconverted per-expert loop; FP8 tiles start at each expert's first row, so
        # no bucket padding
        return xs, ExpertGroups(counts.tolist(), None, None)

    def project(self, xs: torch.Tensor, which: str, groups: ExpertGroups) -> torch.Tensor:
        """[M, K] -> [M, N] with e4m3 operands, the output in the autocast dtype (else the input's)."""
        out_dtype = _out_dtype(xs)
        weight = getattr(self, which)
        if xs.shape[0] == 0:
            return xs.new_zeros(0, weight.shape[1], dtype=out_dtype)
        r = self.recipe
        backend = select_backend(r.backend, xs.device, r.tile, r.block)
        return _Fp8GemmFn.apply(xs, weight, groups.sizes, r, backend, out_dtype)

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, fp8={self.recipe.describe()}"
