"""Published FP8 weights kept frozen in e4m3: the base modules that LoRA trains over, and the requantization
that writes a merged model back in the published layout.

Symbols: M rows (tokens), K in_features, N out_features, E experts, H hidden, I expert width, b the weight
block (128 in the published checkpoints), t the activation tile (1 x b).

A published DeepSeek-V3 weight is e4m3 ``weight`` [N, K] plus float32 ``weight_scale_inv``
[ceil(N/b), ceil(K/b)], one dequantization multiplier per b x b block (the last row / column of blocks may
be partial). That is exactly ``quant.Fp8Tensor(weight, weight_scale_inv, (b, b))``, so the stored blocks go
straight into the FP8 backend's GEMMs, never through a float copy that stays resident:

    forward   y  = gemm(x  in 1 x b tiles along K,  W   stored blocks)               [M, N]
    dgrad     dx = gemm(dy in 1 x b tiles along N,  W^T stored blocks transposed)    [M, K]
    wgrad     none: the weight is frozen (a buffer, not a parameter), so nothing is saved for it either

The input gradient runs as an FP8 GEMM over the stored blocks transposed (``Fp8Tensor.t()`` is exact) rather
than by dequantizing W for one bf16 GEMM, for three reasons: it is the dgrad of DeepSeek's own recipe
(1 x 128 tiles of dy, which Appendix B.2 found safe, unlike 128 x 128 blocks of activation gradients), so the
base sees the numerics it was trained with; on Hopper it runs on the FP8 tensor cores at twice the bf16 rate;
and no bf16 copy of W (2 bytes per weight) is ever made, so the peak stays one byte per frozen weight through
the backward too. The cost is dy's quantization error in dx (the same size as x's in y). The emulated
backend (the CPU) dequantizes both operands inside each GEMM and frees them after, which is what emulation
means; nothing is kept. Nothing of x is saved for backward: there is no weight gradient to need it.

Both modules keep their stored dtypes when the model is cast (``model.to(torch.bfloat16)`` moves them but
leaves e4m3 as e4m3 and the scales float32), because the loader casts the whole model to the dtype asked for.

Requantization (``requantize_blocks``) is ``quant.quantize_blocks``: scale_inv = amax / 448 per block, the
convention of DeepSeek's checkpoints and of ``quant.py``; dequantize(requantize(w)) is within 2^-4 |w| of w
element by element, and a weight already e4m3-representable in that convention comes back in the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from frugallm.errors import ConfigError
from frugallm.model.moe import ExpertGroups, GroupedExperts
from frugallm.precision.backends import Fp8Backend, select_backend
from frugallm.precision.quant import E4M3, Fp8Tensor, dequantize, quantize, quantize_blocks
from frugallm.precision.recipe import Fp8Recipe

WEIGHT_BLOCK = 128  # the published checkpoints' weight_block_size
SCALE_SUFFIX = "_scale_inv"  # the published name of a weight's block scales: ``<weight>_scale_inv``


def block_grid(rows: int, cols: int, block: int = WEIGHT_BLOCK) -> tuple[int, int]:
    """Shape of the scale grid of a [rows, cols] weight: partial blocks count as blocks."""
    return -(-rows // block), -(-cols // block)


def requantize_blocks(w: torch.Tensor, block: int = WEIGHT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [..., N, K] -> (e4m3 [..., N, K], scale_inv float32 [..., ceil(N/b), ceil(K/b)]) in the
    published layout: scale_inv = amax / 448 per block (1 for an all-zero block), w ~ e4m3 * scale_inv."""
    q = quantize_blocks(w.detach(), block)
    return q.data, q.scale


class RequantizationError(NamedTuple):
    """How far a set of float weights moves when written in e4m3 blocks."""

    rel_frobenius: float  # ||W_q - W|| / ||W|| over all weights together
    max_abs: float  # max |W_q - W| over all elements
    worst: str  # name of the weight with the largest relative Frobenius error
    worst_rel: float  # that weight's own relative Frobenius error
    elements: int  # how many weight elements were measured


def requantization_error(weights: Iterable[tuple[str, torch.Tensor]],
                         block: int = WEIGHT_BLOCK) -> RequantizationError:
    """Requantize each (name, weight [..., N, K]) and measure the error, one weight at a time (so at most one
    weight's float copy is alive), e.g. over the merged weights before ``frugallm merge`` writes them."""
    err2 = ref2 = 0.0
    max_abs, worst, worst_rel, n = 0.0, "", 0.0, 0
    for name, w in weights:
        wf = w.detach().float()
        back = dequantize(Fp8Tensor(*requantize_blocks(wf, block), (block, block)))
        diff = back - wf
        e2, r2 = float(diff.square().sum()), float(wf.square().sum())
        err2, ref2, n = err2 + e2, ref2 + r2, n + wf.numel()
        max_abs = max(max_abs, float(diff.abs().max())) if wf.numel() else max_abs
        rel = (e2 / r2) ** 0.5 if r2 > 0 else 0.0
        if rel >= worst_rel:
            worst, worst_rel = name, rel
    return RequantizationError((err2 / ref2) ** 0.5 if ref2 > 0 else 0.0, max_abs, worst, worst_rel, n)


def tensor_bytes_by_dtype(module: nn.Module) -> dict[torch.dtype, int]:
    """Bytes of the parameters and buffers of ``module`` by dtype (a tied weight once, as ``parameters()``
    yields it once); on the meta device it counts what would be allocated."""
    out: dict[torch.dtype, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        out[t.dtype] = out.get(t.dtype, 0) + t.numel() * t.element_size()
    return out


# ----- the GEMM ----------------------------------------------------------------------------------------
class _FrozenFp8GemmFn(torch.autograd.Function):
    """y = x [W_1; W_2; ...]^T over stored e4m3 blocks (one part for a linear, gate and up for experts whose
    blocks do not stack), for a plain linear (sizes None, parts [N_p, K]) or routed experts (sizes[e] rows
    of x for expert e, parts [E, N_p, K]). Only x gets a gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, parts: tuple[Fp8Tensor, ...],  # type: ignore[override]
                sizes: list[int] | None, pow2: bool, backend: Fp8Backend, out_dtype: torch.dtype) -> torch.Tensor:
        """x [M, K] -> [M, sum of N_p]."""
        tile = parts[0].tile[1]
        xq = quantize(x, (1, tile), pow2)  # [M, K] tiles along K, shared by the parts
        outs = [backend.gemm_nt(xq, w, out_dtype, fixed_shape=True) if sizes is None
                else backend.grouped_gemm_nt(xq, w, sizes, out_dtype) for w in parts]  # [M, N_p] each
        ctx.parts, ctx.sizes, ctx.pow2, ctx.backend, ctx.x_dtype = parts, sizes, pow2, backend, x.dtype
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        parts, sizes, backend = ctx.parts, ctx.sizes, ctx.backend
        # one part: dx straight in x's dtype; several: summed in float32 first
        acc_dtype = ctx.x_dtype if len(parts) == 1 else torch.float32
        dx = None
        for w, dy_p in zip(parts, dy.split([p.data.shape[-2] for p in parts], dim=-1), strict=True):
            dyq = quantize(dy_p.contiguous(), (1, w.tile[0]), ctx.pow2)  # [M, N_p] tiles along N_p
            wt = w.t()  # [(E,) K, N_p]: the stored blocks, transposed (exact)
            g = (backend.gemm_nt(dyq, wt, acc_dtype, fixed_shape=True) if sizes is None
                 else backend.grouped_gemm_nt(dyq, wt, sizes, acc_dtype))  # [M, K]
            dx = g if dx is None else dx + g
        assert dx is not None
        return dx.to(ctx.x_dtype), None, None, None, None, None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _check_recipe(recipe: Fp8Recipe, block: int) -> Fp8Recipe:
    """The stored blocks fix the GEMM's K groups: activation tiles must be 1 x block to share them."""
    if recipe.block != block or recipe.tile != block:
        raise ConfigError(f"fp8 tile and block must equal the stored weight block {block} for frozen FP8 "
                          f"weights, got tile={recipe.tile}, block={recipe.block}")
    return recipe


class _KeepsStoredDtypes(nn.Module):
    """``_apply`` that moves the stored e4m3 data and float32 scales between devices but never casts them:
    ``model.to(torch.bfloat16)`` would otherwise turn e4m3 into bf16 (twice the bytes) and round the scales."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            probe = fn(t.new_empty(0))  # what fn does to a tensor like t: its device and dtype
            if probe.dtype == t.dtype:
                return fn(t)
            if t.is_meta:  # nothing to copy: allocate (or keep on meta) in the stored dtype
                return torch.empty_like(t, device=probe.device)
            return t.to(probe.device)

        return super()._apply(keep_dtype, recurse)


# ----- the linear --------------------------------------------------------------------------------------
class FrozenFp8Linear(_KeepsStoredDtypes):
    """A bias-free linear whose weight is the checkpoint's e4m3 blocks, frozen: buffers ``weight``
    (float8_e4m3fn [N, K]) and ``weight_scale_inv`` (float32 [ceil(N/b), ceil(K/b)]), the published names, so
    its state_dict is the checkpoint's. No parameters. Output in the autocast dtype (else the input's)."""

    weight: torch.Tensor
    weight_scale_inv: torch.Tensor

    def __init__(self, in_features: int, out_features: int, *, block: int = WEIGHT_BLOCK,
                 recipe: Fp8Recipe | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.recipe = _check_recipe(recipe or Fp8Recipe(tile=block, block=block), block)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=E4M3, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(block_grid(out_features, in_features, block),
                                                            dtype=torch.float32, device=device))

    @classmethod
    def from_blocks(cls, weight: torch.Tensor, scale_inv: torch.Tensor, *, block: int = WEIGHT_BLOCK,
                    recipe: Fp8Recipe | None = None) -> FrozenFp8Linear:
        """Take over a stored e4m3 weight [N, K] and its scales (no copy)."""
        if weight.dtype != E4M3 or weight.dim() != 2:
            raise ValueError(f"weight must be a float8_e4m3fn matrix, got {weight.dtype} {tuple(weight.shape)}")
        N, K = weight.shape
        if tuple(scale_inv.shape) != block_grid(N, K, block):
            raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {(N, K)} in "
                             f"{block}x{block} blocks (expected {block_grid(N, K, block)})")
        with torch.device("meta"):
            new = cls(K, N, block=block, recipe=recipe)
        new.weight, new.weight_scale_inv = weight, scale_inv.float()
        return new

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, block: int = WEIGHT_BLOCK,
                   recipe: Fp8Recipe | None = None) -> FrozenFp8Linear:
        """Quantize a float weight [N, K] into the published blocks (``requantize_blocks``)."""
        return cls.from_blocks(*requantize_blocks(weight, block), block=block, recipe=recipe)

    def blocks(self) -> Fp8Tensor:
        return Fp8Tensor(self.weight, self.weight_scale_inv, (self.block, self.block))

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the checkpoint means it, [N, K] (for merging a LoRA adapter into it)."""
        return dequantize(self.blocks(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, K = x.shape
        out_dtype = _out_dtype(x)
        if x.numel() == 0:
            return x.new_zeros(*lead, self.out_features, dtype=out_dtype)
        r = self.recipe
        backend = select_backend(r.backend, x.device, r.tile, r.block)
        y = _FrozenFp8GemmFn.apply(x.reshape(-1, K), (self.blocks(),), None, r.pow2_scales, backend,
                                   out_dtype)  # [M, N]
        return y.view(*lead, self.out_features)  # [*, N]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, frozen e4m3 "
                f"{self.block}x{self.block} blocks, backend={self.recipe.backend}")


# ----- the routed experts ------------------------------------------------------------------------------
class FrozenFp8Experts(_KeepsStoredDtypes, GroupedExperts):
    """Routed experts frozen in e4m3, stacked [E, ...] as buffers with ``<name>_scale_inv`` block scales
    [E, ceil(N/b), ceil(K/b)] beside each. When I is a multiple of b the published gate and up blocks stack
    cleanly into ``gate_up_proj`` [E, 2I, H] (one GEMM); otherwise the gate's last block row is partial and
    they stay ``gate_proj`` / ``up_proj`` [E, I, H], run as two GEMMs whose outputs are concatenated.
    ``down_proj`` is [E, H, I]. ``GroupedExperts.__init__`` is bypassed: no float weight is ever allocated."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, *, block: int = WEIGHT_BLOCK,
                 recipe: Fp8Recipe | None = None, device: torch.device | str | None = None):
        nn.Module.__init__(self)  # not GroupedExperts.__init__: its float gate_up_proj / down_proj
        self.n_experts, self.intermediate, self.block = n_experts, intermediate, block
        self.recipe = _check_recipe(recipe or Fp8Recipe(tile=block, block=block), block)
        self.fused = intermediate % block == 0
        gate_up = {"gate_up_proj": 2 * intermediate} if self.fused else {"gate_proj": intermediate,
                                                                         "up_proj": intermediate}
        shapes = {**{k: (n, hidden) for k, n in gate_up.items()}, "down_proj": (hidden, intermediate)}
        for name, (n, k) in shapes.items():
            self.register_buffer(name, torch.zeros(n_experts, n, k, dtype=E4M3, device=device))
            self.register_buffer(name + SCALE_SUFFIX, torch.ones(n_experts, *block_grid(n, k, block),
                                                                 dtype=torch.float32, device=device))
        self.stored = tuple(shapes)  # buffer names of the e4m3 stacks

    @classmethod
    def from_float(cls, experts: GroupedExperts, *, block: int = WEIGHT_BLOCK,
                   recipe: Fp8Recipe | None = None) -> FrozenFp8Experts:
        """Quantize float experts per expert and per published tensor (gate, up, down each its own blocks)."""
        E, I, H = experts.n_experts, experts.intermediate, experts.hidden
        with torch.device("meta"):
            new = cls(E, H, I, block=block, recipe=recipe)
        new.to_empty(device=experts.down_proj.device)
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # [E, 2I, H], [E, H, I]
        for part, w in (("gate_proj", gate_up[:, :I]), ("up_proj", gate_up[:, I:]), ("down_proj", down)):
            q, s = requantize_blocks(w, block)  # [E, N, K], [E, ceil(N/b), ceil(K/b)]
            for e in range(E):
                data, scale = new.expert_blocks(e, part)
                data.copy_(q[e])
                scale.copy_(s[e])
        return new

    def expert_blocks(self, e: int, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (data [N, K], scale_inv [ceil(N/b), ceil(K/b)]) of expert ``e``'s published tensor ``part``
        ('gate_proj' | 'up_proj' | 'down_proj'), what the checkpoint's ``experts.<e>.<part>.weight`` and its
        ``weight_scale_inv`` fill (loading) or are written from (saving)."""
        if part not in ("gate_proj", "up_proj", "down_proj"):
            raise ValueError(f"expert part must be gate_proj, up_proj or down_proj, got {part!r}")
        if part == "down_proj" or not self.fused:
            return getattr(self, part)[e], getattr(self, part + SCALE_SUFFIX)[e]
        rows, block_rows = self.intermediate, self.intermediate // self.block  # gate first, then up
        data, scale = self.gate_up_proj[e], self.gate_up_proj_scale_inv[e]
        if part == "gate_proj":
            return data[:rows], scale[:block_rows]
        return data[rows:], scale[block_rows:]

    def parts(self, which: str) -> tuple[Fp8Tensor, ...]:
        """The stored stacks projection ``which`` (in PROJECTIONS) runs over, in output order."""
        if which == "gate_up_proj":
            names = ("gate_up_proj",) if self.fused else ("gate_proj", "up_proj")
        elif which == "down_proj":
            names = ("down_proj",)
        else:
            raise ValueError(f"projection must be one of {', '.join(self.PROJECTIONS)}, got {which!r}")
        b = (self.block, self.block)
        return tuple(Fp8Tensor(getattr(self, n), getattr(self, n + SCALE_SUFFIX), b) for n in names)

    def dequantize_weight(self, which: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Projection ``which`` ('gate_up_proj' -> [E, 2I, H], gate rows first; 'down_proj' -> [E, H, I])
        dequantized, the layout of ``GroupedExperts``' float parameter of that name (for merging)."""
        return torch.cat([dequantize(p, dtype) for p in self.parts(which)], dim=1)

    def compute_dtype(self, xs: torch.Tensor) -> torch.dtype:
        return xs.dtype  # the GEMMs quantize their operand themselves; no cast to the autocast dtype first

    def group(self, xs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ExpertGroups]:
        # FP8 tiles start at each expert's first row: no bucket padding, one host sync for the sizes
        return xs, ExpertGroups(counts.tolist(), None, None)

    def project(self, xs: torch.Tensor, which: str, groups: ExpertGroups) -> torch.Tensor:
        """[M, K] -> [M, N] over the stored blocks, the output in the autocast dtype (else the input's)."""
        parts = self.parts(which)
        out_dtype = _out_dtype(xs)
        if xs.shape[0] == 0:
            return xs.new_zeros(0, sum(p.data.shape[-2] for p in parts), dtype=out_dtype)
        r = self.recipe
        backend = select_backend(r.backend, xs.device, r.tile, r.block)
        return _FrozenFp8GemmFn.apply(xs, parts, groups.sizes, r.pow2_scales, backend, out_dtype)

    def extra_repr(self) -> str:
        layout = "gate_up stacked" if self.fused else "gate and up apart"
        return (f"experts={self.n_experts}, hidden={self.hidden}, intermediate={self.intermediate}, frozen e4m3 "
                f"{self.block}x{self.block} blocks ({layout}), backend={self.recipe.backend}")


def frozen_fp8_modules(model: nn.Module) -> list[str]:
    """Dotted names of the frozen FP8 modules, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (FrozenFp8Linear, FrozenFp8Experts))]
