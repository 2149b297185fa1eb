"""Where the FP8 GEMMs run. Every GEMM of the recipe is one "NT" product of two quantized operands that are
both scaled along their shared contraction dim K:

    gemm_nt(a, b) = dequant(a) @ dequant(b)^T        a: [M, K] in 1x128 tiles, b: [N, K] in 1x128 tiles
                                                     or 128x128 blocks; result [M, N], accumulated in FP32

Two backends implement it behind the same small interface (``Fp8Backend``):

``emulated``  real e4m3 operands with the exact tile and block scales, dequantized and multiplied in FP32.
              Runs on the CPU and any GPU; it is the numerics reference (products of e4m3 values are exact
              in FP32, so the only rounding besides the quantization is FP32 accumulation, which is better
              than Hopper's tensor cores, whose ~14-bit accumulators DeepSeek promotes to FP32 every 128 K).
``hopper``    ``torch.nn.functional.scaled_mm`` with blockwise scales (cuBLAS, CUDA >= 12.9, compute
              capability 9.0): ScalingType.BlockWise1x128 for a, BlockWise128x128 or BlockWise1x128 for b.
              Operands and scales must be laid out as cuBLAS reads them; ``scaled_mm_args`` does that and is
              plain tensor code, so the CPU tests check it against the emulated backend (everything but the
              GEMM call). At start-up the backend runs a probe GEMM against the emulated result and refuses
              to start (``DeviceError``) if the installed PyTorch cannot do it or disagrees.

Routed experts run one GEMM per expert on its contiguous slice of the sorted tokens (``grouped_gemm_nt``).
On Hopper a grouped kernel (DeepGEMM's contiguous layout, or a Triton kernel) would save the per-expert
launches; PyTorch's ``scaled_grouped_mm`` has no blockwise recipe on sm90 yet.

``select_backend(name, device, tile, block)`` picks one: ``auto`` is ``hopper`` on a capable GPU and
``emulated`` elsewhere; the choice is logged once per device under the ``frugallm.precision`` logger.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from frugallm.errors import DeviceError
from frugallm.kernels import KernelPolicy, choose, gemm
from frugallm.precision.quant import E4M3, Fp8Tensor, dequantize, quantize

log = logging.getLogger("frugallm.precision")

BACKENDS = ("auto", "emulated", "hopper")
HOPPER_TILE = 128  # cuBLAS blockwise FP8 knows 1x128 and 128x128 groups only


class Fp8Backend:
    """The interface: two quantized operands scaled along K in, their FP32-accumulated product out."""

    name = "base"

    def gemm_nt(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype,
                fixed_shape: bool = False) -> torch.Tensor:
        """a.data [M, K], b.data [N, K] -> a @ b^T  [M, N] in out_dtype. ``fixed_shape``: the shapes recur
        every step (a plain linear, not one expert's slice), so a kernel built per shape pays off."""
        raise NotImplementedError

    def grouped_gemm_nt(self, a: Fp8Tensor, b: Fp8Tensor, sizes: list[int],
                        out_dtype: torch.dtype) -> torch.Tensor:
        """a.data [M, K] rows sorted by group (sizes[e] rows for group e), b.data [E, N, K]:
        rows of group e times b[e]^T -> [M, N]."""
        M, N = a.data.shape[0], b.data.shape[-2]
        out = torch.zeros(M, N, dtype=out_dtype, device=a.data.device)
        start = 0
        for e, m in enumerate(sizes):
            if m:
                out[start : start + m] = self.gemm_nt(a.rows(start, start + m), b.select(e), out_dtype)
            start += m
        return out


class EmulatedBackend(Fp8Backend):
    name = "emulated"

    def __init__(self, kernels: KernelPolicy | None = None):
        # the FP32 GEMM's library: the kernel policy's (frugallm.kernels.gemm), else torch's own
        self.kernels = kernels or KernelPolicy()

    def gemm_nt(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype,
                fixed_shape: bool = False) -> torch.Tensor:
        _check_k(a, b)
        with torch.autocast(a.data.device.type, enabled=False):  # the product must stay FP32
            # FP32 GEMM on the CPU's faster library where shapes recur (frugallm.kernels.gemm)
            out = gemm.nt(dequantize(a), dequantize(b), self.kernels, training=fixed_shape)  # [M, N]
        return out.to(out_dtype)

    def grouped_gemm_nt(self, a: Fp8Tensor, b: Fp8Tensor, sizes: list[int],
                        out_dtype: torch.dtype) -> torch.Tensor:
        _check_k(a, b)
        xs, ws = dequantize(a), dequantize(b)  # [M, K], [E, N, K] dequantized once, not per expert
        out = torch.zeros(xs.shape[0], ws.shape[-2], dtype=out_dtype, device=xs.device)
        start = 0
        with torch.autocast(xs.device.type, enabled=False):
            for e, m in enumerate(sizes):
                if m:
                    out[start : start + m] = (xs[start : start + m] @ ws[e].t()).to(out_dtype)  # [m_e, N]
                start += m
        return out


class ScaledMMArgs(NamedTuple):
    """The arguments of one blockwise ``F.scaled_mm`` call, in the layouts cuBLAS requires (sm90, CUDA 12.9):
    mat_a [Mp, Kp] row-major; mat_b [Kp, Np] column-major; Mp, Np, Kp padded to multiples of 128 with zeros;
    scale_a [Mp, Kp/128] with stride (1, Mp) ("outer-dim-major");
    scale_b [L4, Np/128] with stride (1, L4) for 128x128 blocks, L4 = Kp/128 rounded up to a multiple of 4,
            or [Np, Kp/128] with stride (1, Np) for 1x128 tiles."""

    mat_a: torch.Tensor
    mat_b: torch.Tensor
    scale_a: torch.Tensor
    recipe_a: str  # "1x128"
    scale_b: torch.Tensor
    recipe_b: str  # "128x128" | "1x128"
    out_shape: tuple[int, int]  # (M, N) to crop the padded product to


def _pad_to(n: int, m: int = HOPPER_TILE) -> int:
    return -(-n // m) * m


def _pad_fp8(data: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D e4m3 tensor to [rows, cols], row-major. Padded through uint8 (0x00 is +0.0 in e4m3)
    because constant padding is not implemented for float8 dtypes."""
    R, C = data.shape
    raw = data.contiguous().view(torch.uint8)
    if rows != R or cols != C:
        raw = F.pad(raw, (0, cols - C, 0, rows - R))
    return raw.contiguous().view(E4M3)


def _pad_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    R, C = scale.shape
    return F.pad(scale, (0, cols - C, 0, rows - R), value=1.0).contiguous()  # padded data is 0: any scale


class HopperBackend(Fp8Backend):
    name = "hopper"

    def __init__(self, device: torch.device):
        self.device = device
        require_hopper(device)
        self._probe()

    @staticmethod
    def scaled_mm_args(a: Fp8Tensor, b: Fp8Tensor) -> ScaledMMArgs:
        """Pad and lay out a [M, K] (1x128 tiles) and b [N, K] (1x128 tiles or 128x128 blocks) for cuBLAS.
        Pure tensor code: runs on the CPU, where the tests compare it with the emulated backend."""
        _check_k(a, b)
        if a.tile != (1, HOPPER_TILE) or b.tile not in ((1, HOPPER_TILE), (HOPPER_TILE, HOPPER_TILE)):
            raise ValueError(f"hopper FP8 GEMMs need a in 1x{HOPPER_TILE} tiles and b in 1x{HOPPER_TILE} tiles "
                             f"or {HOPPER_TILE}x{HOPPER_TILE} blocks, got a {a.tile}, b {b.tile}")
        (M, K), N = a.data.shape, b.data.shape[0]
        Mp, Np, Kp = _pad_to(M), _pad_to(N), _pad_to(K)
        Kt = Kp // HOPPER_TILE
        mat_a = _pad_fp8(a.data, Mp, Kp)  # [Mp, Kp] row-major
        mat_b = _pad_fp8(b.data, Np, Kp).t()  # [Kp, Np] column-major: b stays K-contiguous
        scale_a = _pad_scale(a.scale, Mp, Kt).t().contiguous().t()  # [Mp, Kt], stride (1, Mp)
        if b.tile[0] == 1:
            scale_b = _pad_scale(b.scale, Np, Kt).t().contiguous().t()  # [Np, Kt], stride (1, Np)
            recipe_b = "1x128"
        else:
            L4 = _pad_to(Kt, 4)
            scale_b = _pad_scale(b.scale, Np // HOPPER_TILE, L4).t()  # [L4, Np/128], stride (1, L4)
            recipe_b = "128x128"
        return ScaledMMArgs(mat_a, mat_b, scale_a, "1x128", scale_b, recipe_b, (M, N))

    def gemm_nt(self, a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype,
                fixed_shape: bool = False) -> torch.Tensor:
        args = self.scaled_mm_args(a, b)
        M, N = args.out_shape
        kind = {"1x128": F.ScalingType.BlockWise1x128, "128x128": F.ScalingType.BlockWise128x128}
        # cuBLAS writes bf16 or fp32; anything else is cast from fp32
        gemm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
        out = F.scaled_mm(args.mat_a, args.mat_b, args.scale_a, kind[args.recipe_a], args.scale_b,
                          kind[args.recipe_b], output_dtype=gemm_dtype)  # [Mp, Np]
        return out[:M, :N].to(out_dtype)

    def _probe(self) -> None:
        """One forward-shaped and one wgrad-shaped GEMM on random data, compared with the emulated backend:
        proves that this PyTorch build has the kernels and that our layouts mean what we think."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(200, 300, device=self.device, generator=gen)  # not multiples of 128: tests padding
        w = torch.randn(260, 300, device=self.device, generator=gen)
        ref = EmulatedBackend()
        for b_tile in ((HOPPER_TILE, HOPPER_TILE), (1, HOPPER_TILE)):
            a, b = quantize(x, (1, HOPPER_TILE)), quantize(w, b_tile)
            try:
                got = self.gemm_nt(a, b, torch.float32)
            except (RuntimeError, AttributeError, TypeError) as e:
                raise DeviceError(f"fp8 backend 'hopper': blockwise scaled_mm failed on {self.device} "
                                  f"(needs PyTorch >= 2.9 built with CUDA >= 12.9): {e}") from None
            want = ref.gemm_nt(a, b, torch.float32)
            err = float((got - want).norm() / want.norm())
            if not err < 1e-3:
                raise DeviceError(f"fp8 backend 'hopper': blockwise scaled_mm disagrees with the emulated "
                                  f"reference (relative error {err:.2e}, b tiles {b_tile}); use 'emulated'")


def _check_k(a: Fp8Tensor, b: Fp8Tensor) -> None:
    if a.data.shape[-1] != b.data.shape[-1]:
        raise ValueError(f"contraction dims differ: a {tuple(a.data.shape)}, b {tuple(b.data.shape)}")
    if a.tile[1] != b.tile[1]:
        raise ValueError(f"a and b must share the K tile, got {a.tile} and {b.tile}")


def hopper_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """None when blockwise FP8 GEMMs can run on ``device`` (default: the current CUDA device), else why not."""
    if not torch.cuda.is_available():
        return (f"no CUDA GPU is visible (torch {torch.__version__}); it needs compute capability >= 9.0 "
                "(H100, H200, H800)")
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return f"tensors are on {device.type}, not on a CUDA GPU of compute capability >= 9.0"
    cap = torch.cuda.get_device_capability(device)
    if cap < (9, 0):
        return (f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}; "
                "FP8 tensor cores with blockwise scales need >= 9.0 (H100, H200, H800)")
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        return f"torch {torch.__version__} has no blockwise scaled_mm (needs >= 2.9 with CUDA >= 12.9)"
    return None


def require_hopper(device: torch.device | str | None = None) -> None:
    """Raise ``DeviceError`` naming why, and what to use instead, when the 'hopper' backend cannot run."""
    reason = hopper_unavailable_reason(device)
    if reason:
        raise DeviceError(f"fp8 backend 'hopper' is not available: {reason}. "
                          "Use backend 'emulated' (any device) or 'auto'.")


@functools.cache
def _chosen_for(device_type: str) -> KernelPolicy:
    return choose(device_type)  # the GEMM library does not depend on the precision


@functools.cache
def _backend_for(name: str, device: torch.device, kernels: KernelPolicy) -> Fp8Backend:
    if name == "emulated":
        backend: Fp8Backend = EmulatedBackend(kernels)
    elif name == "hopper":
        backend = HopperBackend(device)
    else:  # auto: the fastest that works here
        backend = EmulatedBackend(kernels)
        if hopper_unavailable_reason(device) is None:
            try:
                backend = HopperBackend(device)
            except DeviceError as e:
                log.warning("%s; falling back to the emulated backend", e)
    log.info("fp8 backend: %s on %s (asked for %s)", backend.name, device, name)
    return backend


def select_backend(name: str, device: torch.device | str, tile: int = 128, block: int = 128,
                   kernels: KernelPolicy | None = None) -> Fp8Backend:
    """The backend ``name`` ('auto' | 'emulated' | 'hopper') for tensors on ``device``, built and logged once.
    Tiles other than 128 exist only in emulation (ablations); 'auto' then picks 'emulated'. ``kernels``: the
    policy whose GEMM library the emulated backend's FP32 GEMMs use, by default the one chosen for
    ``device``."""
    if name not in BACKENDS:
        raise DeviceError(f"unknown fp8 backend {name!r}; allowed: {', '.join(BACKENDS)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if (tile, block) != (HOPPER_TILE, HOPPER_TILE):
        if name == "hopper":
            raise DeviceError(f"fp8 backend 'hopper' needs tile = block = {HOPPER_TILE}, got {tile}, {block}")
        name = "emulated"
    return _backend_for(name, device, kernels or _chosen_for(device.type))
