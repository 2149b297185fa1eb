"""The float32 GEMMs of a training step on oneDNN instead of MKL, where the kernel policy says so
(``KernelPolicy.gemm == "onednn"``).

PyTorch sends every float32 matmul on the CPU to MKL's sgemm. On this project's AMD EPYC (Zen 4, AVX-512,
2 threads) MKL runs its generic Zen kernel (``mkl_blas_def_sgemm_kernel_0_zen`` in a perf profile), while
oneDNN, which PyTorch also ships (it runs the bf16 matmuls), has AVX-512 brgemm kernels that compute the same
IEEE float32 products faster for two of a linear's three GEMMs. ``benchmarks/cpu_gemm.py`` times both
libraries on the same operands in one process; on that EPYC, at the ``tiny`` preset's fixed-shape layers
with 4,096 rows (GFLOP/s, MKL / oneDNN; time summed over the ten shapes):

    fwd    y  = x W^T   e.g. dense gate_up (K 256, N 1536)  159 / 194    all shapes: oneDNN 1.16x faster
    dgrad  dx = g W     e.g. lm_head (K 256, N 8192)        139 / 178    all shapes: oneDNN 1.26x faster
    wgrad  dW = g^T x   oneDNN reads both operands transposed           all shapes: oneDNN 0.61x (slower)

So ``linear`` runs the forward and the input gradient through oneDNN and keeps the weight gradient on MKL.
With oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) it is no faster than MKL. On an Intel Xeon with
AVX-512 and AMX (2 threads), MKL runs its own AVX-512 kernels and is the faster library for all three roles
(fwd 0.93x, dgrad 0.96x, wgrad 0.47x for oneDNN, same benchmark). So the policy picks oneDNN only where
PyTorch reports AVX-512 and the CPU is not Intel's, that is where MKL falls back to a generic kernel
(``frugallm.kernels.policy.choose``).
Accumulation stays float32 in both; only the summation order differs (a relative difference of about 6e-7
on these shapes, which the benchmark prints).

oneDNN builds one kernel per problem shape and keeps about a thousand: a shape that changes every step
(a routed expert's token count) would build a kernel on most calls (400 token counts in a row, each new: 97 GFLOP/s
against MKL's 163, and 186 once they were built; measured at an expert's [M, 256] x [256, 384]).
So only GEMMs whose shapes are fixed for a run take this path: the ``Linear`` layers (attention projections,
dense and shared-expert MLPs, the MTP projection) and the output head, and only while training (grad
enabled); serving's shapes change with every batch and stay on MKL, as do bf16 (autocast routes it to
oneDNN already), GPUs and tensor subclasses (FSDP's DTensor, FP8 wrappers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from frugallm.kernels.policy import KernelPolicy


def _plain(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor or type(t) is nn.Parameter


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, kernels: KernelPolicy,
                   training: bool | None = None) -> bool:
    """Whether ``linear(x, weight, None, kernels)`` runs on oneDNN (module doc: the policy's choice, and
    training, CPU, float32, plain tensors). ``training`` defaults to grad mode; code inside an autograd
    Function, where grad mode is off, says it."""
    training = torch.is_grad_enabled() if training is None else training
    return (kernels.gemm == "onednn" and training and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and _plain(x) and _plain(weight) and x.numel() > 0)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t itself if it is row-major or the transpose of a row-major matrix, else a row-major copy: oneDNN runs
    a reference kernel on any other strides (a [4096, 192] view with row stride 256, cropped from a padded
    tensor, took 2.7 s here against 3 ms dense)."""
    return t if t.is_contiguous() or t.t().is_contiguous() else t.contiguous()


def onednn_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T on oneDNN's inner product (either may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(_dense(a), _dense(b), None, "none", [], "")


def nt(a: torch.Tensor, b: torch.Tensor, kernels: KernelPolicy, training: bool | None = None) -> torch.Tensor:
    """a [M, K] @ b[N, K]^T -> [M, N], no autograd: on oneDNN where ``linear`` would use it, else torch's."""
    if onednn_applies(a, b, kernels, training):
        return onednn_nt(a, b)
    return a @ b.transpose(-2, -1)


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T with the forward and the input gradient on oneDNN and the weight gradient on MKL. Saves
    what ``F.linear`` saves: the input and the weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        ctx.save_for_backward(x2, weight)
        ctx.lead = x.shape[:-1]
        return onednn_nt(x2, weight).view(*x.shape[:-1], weight.shape[0])  # [*, N]

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative: a double backward is an error, not a silent zero
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # type: ignore[override]
        x2, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # [M, N]
        dx = onednn_nt(g2, weight.t()).view(*ctx.lead, weight.shape[1]) if ctx.needs_input_grad[0] else None
        dw = g2.t() @ x2 if ctx.needs_input_grad[1] else None  # [N, K] on MKL (module doc)
        return dx, dw


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernels: KernelPolicy) -> torch.Tensor:
    """``F.linear`` on the library ``kernels`` chooses (the module doc says when oneDNN runs)."""
    if bias is None and onednn_applies(x, weight, kernels):
        return _OneDnnLinear.apply(x, weight)
    return F.linear(x, weight, bias)
