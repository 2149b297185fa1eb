"""Fine-grained e4m3 quantization: one float32 scale per tile (1 x t) or block (b x b) of a matrix.

A tensor is quantized over its last two dims [R, C] (leading dims, such as the expert dim of stacked
expert weights, are batch). ``tile = (tr, tc)`` is the group that shares one scale:
    (1, 128)    activations and activation gradients: 128 consecutive elements of one row (along K)
    (128, 128)  weights
    (128, 1)    a (1, 128) tiling seen through a transpose (``Fp8Tensor.t()``)

For each group g:
    amax_g  = max |x| over the finite elements of g
    scale_g = amax_g / 448            (448 = largest e4m3 value; optionally rounded up to a power of two)
    q       = e4m3(x / scale_g)       round to nearest even, |q| <= 448
    x       ~ q * scale_g             ``scale`` is the dequantization multiplier, the convention of the
                                      published checkpoint's ``weight_scale_inv`` and of ``torch._scaled_mm``

Edge cases, each decided here once:
- dims that are not multiples of the group are zero-padded for the amax only; ``data`` keeps the
  original shape and ``scale`` has ceil(R/tr) x ceil(C/tc) entries, the last row/column covering a
  partial group;
- an all-zero group gets scale 1 (any scale represents zero exactly; 1 avoids 0/0);
- a group of denormal-small values gets a scale clamped to float32's smallest normal, never 0;
- +-inf and NaN are excluded from the amax, so the finite values of their group keep full precision,
  and become NaN in e4m3 (the format has no infinity): an overflow stays visible to the loss and the
  gradient-norm checks instead of being saturated silently to +-448.

Round-trip bound used by the tests: e4m3 keeps 3 mantissa bits, so for a scaled value v = x / scale in the
normal range (|v| >= 2^-6) the rounding error is at most half a unit in the last place,
|q - v| <= 2^-4 * 2^floor(log2 |v|) <= 2^-4 |v|; below it (subnormals, spacing 2^-9) it is at most 2^-10.
So |dequantize(quantize(x)) - x| <= max(2^-4 |x|, 2^-10 scale) element by element.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_SCALE_MIN = torch.finfo(torch.float32).tiny  # 2^-126: a scale never underflows to 0


class Fp8Tensor(NamedTuple):
    """A quantized matrix (or a batch of them): ``data * scale`` broadcast over ``tile`` groups."""

    data: torch.Tensor  # [..., R, C] float8_e4m3fn, unpadded
    scale: torch.Tensor  # [..., ceil(R/tr), ceil(C/tc)] float32 dequantization multipliers
    tile: tuple[int, int]  # (tr, tc): rows x columns sharing one scale

    def t(self) -> Fp8Tensor:
        """Transpose the last two dims. Exact: the same values, the same groups seen the other way round,
        which is why a 128x128-block weight serves both y = x W^T and dx = dy W without requantizing."""
        return Fp8Tensor(self.data.transpose(-2, -1), self.scale.transpose(-2, -1), self.tile[::-1])

    def rows(self, start: int, end: int) -> Fp8Tensor:
        """Rows start:end of a row-tiled (1 x tc) tensor, e.g. one expert's slice of the sorted tokens."""
        if self.tile[0] != 1:
            raise ValueError(f"row slicing needs 1 x t tiles, got {self.tile}")
        return Fp8Tensor(self.data[..., start:end, :], self.scale[..., start:end, :], self.tile)

    def select(self, index: int) -> Fp8Tensor:
        """One matrix of a batch (the leading dim), e.g. one expert of stacked expert weights."""
        return Fp8Tensor(self.data[index], self.scale[index], self.tile)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def scale_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """amax / 448 per group, safe for zero and tiny amax; with ``pow2`` rounded up to a power of two, so
    that scaling is exact in binary (only the e4m3 rounding remains) and |x / scale| <= 448 still holds."""
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).clamp_min(_SCALE_MIN)
    if pow2:
        mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
        exponent = exponent - (mantissa == 0.5).to(exponent.dtype)  # already a power of two: keep it
        scale = torch.ldexp(torch.ones_like(scale), exponent)
    return scale


def _grouped_view(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """[..., R, C] -> [..., R', tr, C', tc] after zero-padding R and C up to multiples of the tile."""
    tr, tc = tile
    R, C = x.shape[-2:]
    pad_r, pad_c = -R % tr, -C % tc
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))  # zeros never raise an amax
    return x.unflatten(-1, (-1, tc)).unflatten(-3, (-1, tr))  # [..., R', tr, C', tc]


def quantize(x: torch.Tensor, tile: tuple[int, int], pow2: bool = False) -> Fp8Tensor:
    """Quantize the last two dims of ``x`` to e4m3 with one scale per ``tile`` group (see the module doc)."""
    if x.dim() < 2:
        raise ValueError(f"quantize needs a matrix (or a batch of them), got shape {tuple(x.shape)}")
    tr, tc = tile
    R, C = x.shape[-2:]
    groups = _grouped_view(x.float(), tile)  # [..., R', tr, C', tc]
    # On the CPU, max |x| as max(max x, -min x): two reductions that write nothing; a NaN or inf anywhere
    # shows in them, and only then does the masked path run (2.3x faster quantization). Elsewhere the masked
    # path always runs: asking whether all is finite would stall the GPU's queue on every GEMM operand.
    finite = False
    if x.device.type == "cpu":
        amax = torch.maximum(groups.amax(dim=(-3, -1)), groups.amin(dim=(-3, -1)).neg())  # [..., R', C']
        finite = bool(amax.isfinite().all())
    if not finite:
        amax = groups.abs().nan_to_num(nan=0.0, posinf=0.0).amax(dim=(-3, -1))  # finite elements only
    scale = scale_from_amax(amax, pow2)  # [..., R', C']
    scaled = groups / scale[..., :, None, :, None]
    scaled.clamp_(-E4M3_MAX, E4M3_MAX)  # |x| <= amax already; this absorbs the division's last-bit rounding
    if not finite:
        # (x - x) is 0 where finite and NaN at +-inf or NaN: non-finite -> NaN (e4m3 has no inf)
        scaled.add_(groups - groups)
    data = scaled.flatten(-2).flatten(-3, -2)[..., :R, :C].to(E4M3)  # [..., R, C]
    return Fp8Tensor(data, scale, (tr, tc))


def quantize_tiles(x: torch.Tensor, size: int = 128, pow2: bool = False) -> Fp8Tensor:
    """Activations and gradients: 1 x ``size`` tiles along the last (contraction) dim."""
    return quantize(x, (1, size), pow2)


def quantize_blocks(w: torch.Tensor, size: int = 128, pow2: bool = False) -> Fp8Tensor:
    """Weights: ``size`` x ``size`` blocks over the last two dims."""
    return quantize(w, (size, size), pow2)


def expand_scale(scale: torch.Tensor, tile: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Per-group scales [..., R', C'] -> per-element multipliers [..., R, C] (cropping partial groups)."""
    R, C = shape
    return scale.repeat_interleave(tile[0], dim=-2)[..., :R, :].repeat_interleave(tile[1], dim=-1)[..., :C]


@functools.cache
def _e4m3_values() -> torch.Tensor:
    """The float32 value of each of the 256 e4m3 codes (CPU)."""
    return torch.arange(256, dtype=torch.uint8).view(E4M3).float()


def e4m3_to_float(data: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32, exactly. On the CPU through a 256-entry table indexed by the raw byte:
    PyTorch's elementwise e4m3 conversion ran 4.5x slower here (7.9 ms against 1.8 ms per 1M elements,
    1 thread), and the emulated backend converts every GEMM operand."""
    if data.device.type != "cpu":
        return data.float()
    codes = data.contiguous().view(torch.uint8).flatten().to(torch.int32)
    return _e4m3_values().index_select(0, codes).view(data.shape)


def dequantize(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    R, C = q.data.shape[-2:]
    groups = _grouped_view(e4m3_to_float(q.data), q.tile)  # [..., R', tr, C', tc]
    out = groups * q.scale[..., :, None, :, None]
    return out.flatten(-2).flatten(-3, -2)[..., :R, :C].to(dtype)  # [..., R, C]
