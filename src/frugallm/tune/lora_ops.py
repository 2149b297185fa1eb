"""LoRA's training GEMMs as hand-written autograd Functions: one graph node per adapted projection (or per
group of projections that read the same input) whose backward does only what a frozen base needs.

Symbols as ``frugallm.tune.lora``: M rows, K in_features, N out_features, r rank, s scaling, E experts;
for n projections fused on one input, N = N_1 + ... + N_n and R = n r.

Linear (``lora_linear``), n adapted projections over one frozen base weight W = [W_1; ...; W_n] [N, K]:
    forward   y  = x W^T + h Bs^T      h = x A^T       A = [A_1; ...; A_n] [R, K]
                                                        Bs = blockdiag(s_1 B_1, ..., s_n B_n) [N, R]
    backward  dh = g Bs                 [M, R]          (one GEMM for all n adapters)
              dB_i = s_i g_i^T h_i      [N_i, r]        (g_i, h_i: the i-th column blocks)
              dA = dh^T x               [R, K]
              dx = g W + dh A           [M, K]          (the base's input gradient, no dW: W is frozen)
Autograd through ``base(x) + s * (x A^T) B^T`` builds five nodes per projection (two linears, the scale,
an addmm, a view) whose backward computes the same GEMMs and sums dx from two branches with an extra pass;
here the sum is the second GEMM's accumulate (addmm_). h = x A^T is saved for dB, not recomputed. Bs is
block diagonal, so one GEMM serves every adapter at n times its (tiny, r-wide) FLOPs; the dB blocks,
which would waste n x N x R, are per block. A keeps the rank on rows ([r, K], PEFT's layout) so that x A^T
and dh A read it contiguously.

Routed experts (``expert_adapter``, where ``LoraExperts`` cannot use torch._grouped_mm: a rank or width
whose float32 rows are not 16-byte aligned, padded bf16 rows), each expert's rows of xs (contiguous, by
``ExpertGroups.sizes``):
    delta_e = s (xs_e A_e^T) B_e^T      A [E, r, K], B [E, N, r]                        [m_e, N]
as batched GEMMs (``torch.bmm``) over the rows padded per expert to the largest count P: xs is scattered
into [E, P, K] once, the two products and the four backward ones are one bmm each, where a loop over the
experts costs 2E GEMM calls forward and 4E backward (each an allocation and a dispatch for an [m_e, r]
product). The padding rows are zero, so they add nothing to dA or dB.

Where these do not apply (dropout on the adapter input, a base that is not a plain frozen float weight,
autocast choosing another dtype, no grad) the callers in ``frugallm.tune.lora`` take the composite path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from frugallm.kernels import KernelPolicy
from frugallm.kernels.gemm import nt, onednn_applies, onednn_nt
from frugallm.model.layers import Linear


def plain_frozen_weight(base: nn.Module) -> torch.Tensor | None:
    """The weight [N, K] of a plain frozen linear without bias (the only base ``lora_linear`` multiplies
    itself), else None: FP8 linears, tensor subclasses (FSDP's DTensor) and trained or biased bases keep
    their own forward."""
    w = getattr(base, "weight", None)
    if type(base) not in (nn.Linear, Linear) or getattr(base, "bias", None) is not None:
        return None
    if type(w) not in (torch.Tensor, nn.Parameter) or w.requires_grad or not w.is_floating_point():
        return None
    return w


def lora_linear(x: torch.Tensor, weight: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]],
                scalings: list[float], kernels: KernelPolicy) -> torch.Tensor:
    """x [*, K] -> [*, N]: x W^T plus every adapter's s_i (x A_i^T) B_i^T in its column block (module doc).
    ``weight`` is the frozen base weight (the projections' weights concatenated when n > 1), in x's dtype;
    the factors are cast to it inside and their gradients back."""
    flat = [t for ab in factors for t in ab]
    return _LoraLinear.apply(x, weight, kernels, tuple(scalings), *flat)


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, kernels: KernelPolicy,  # type: ignore[override]
                scalings: tuple[float, ...], *flat: torch.Tensor) -> torch.Tensor:
        dt = weight.dtype
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        a_list = [a.to(dt) for a in flat[0::2]]  # each [r, K]
        b_list = [b.to(dt) for b in flat[1::2]]  # each [N_i, r]
        a = a_list[0] if len(a_list) == 1 else torch.cat(a_list)  # [R, K]
        bs = torch.block_diag(*[b * s for b, s in zip(b_list, scalings, strict=True)])  # [N, R]
        # grad mode is off inside a Function: tell the GEMM chooser this is training (fixed shapes)
        y = nt(x2, weight, kernels, training=True)  # [M, N]
        h = nt(x2, a, kernels, training=True)  # [M, R]
        y.addmm_(h, bs.t())
        ctx.save_for_backward(x2, weight, a, bs, h)
        ctx.kernels, ctx.scalings, ctx.lead = kernels, scalings, x.shape[:-1]
        ctx.n_out = [b.shape[0] for b in b_list]
        ctx.factor_dtypes = [t.dtype for t in flat]
        return y.view(*x.shape[:-1], weight.shape[0])  # [*, N]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, weight, a, bs, h = ctx.saved_tensors
        g2 = g.reshape(-1, weight.shape[0]).to(weight.dtype)  # [M, N]
        dh = g2 @ bs  # [M, R]
        grads: list[torch.Tensor | None] = []
        r = h.shape[1] // len(ctx.n_out)
        da = dh.t() @ x2 if any(ctx.needs_input_grad[4::2]) else None  # [R, K]
        col = 0
        for i, (n, s) in enumerate(zip(ctx.n_out, ctx.scalings, strict=True)):
            da_i = da[i * r:(i + 1) * r] if da is not None else None  # [r, K]
            db_i = None
            if ctx.needs_input_grad[5 + 2 * i]:
                db_i = (g2[:, col:col + n].t() @ h[:, i * r:(i + 1) * r]).mul_(s)  # [N_i, r]
            grads += [da_i, db_i]
            col += n
        grads = [None if t is None else t.to(dt) for t, dt in zip(grads, ctx.factor_dtypes, strict=True)]
        dx = None
        if ctx.needs_input_grad[0]:
            if onednn_applies(g2, weight, ctx.kernels, training=True):
                dx = onednn_nt(g2, weight.t())  # [M, K] on oneDNN as the base Linear's dgrad
            else:
                dx = g2 @ weight
            dx = dx.addmm_(dh, a).view(*ctx.lead, weight.shape[1])
        return (dx, None, None, None, *grads)


def expert_adapter(xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sizes: list[int],
                   scaling: float) -> torch.Tensor:
    """xs [rows, K] laid out by expert in slices of ``sizes`` -> s (xs_e A_e^T) B_e^T per row [rows, N], as
    padded batched GEMMs (module doc). a [E, r, K] and b [E, N, r] are cast to xs's dtype inside."""
    E = a.shape[0]
    counts = torch.tensor(sizes, device=xs.device)
    starts = counts.cumsum(0) - counts  # [E] first row of each expert
    owner = torch.repeat_interleave(torch.arange(E, device=xs.device), counts, output_size=xs.shape[0])
    pad = max(sizes) if sizes else 0
    # each row's place in the padded [E * P] layout: its expert's block, then its rank within the expert
    dest = owner * pad + torch.arange(xs.shape[0], device=xs.device) - starts[owner]  # [rows]
    return _ExpertAdapter.apply(xs, a, b, dest, E, pad, scaling)


class _ExpertAdapter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor,  # type: ignore[override]
                dest: torch.Tensor, E: int, pad: int, scaling: float) -> torch.Tensor:
        dt, K, N = xs.dtype, xs.shape[1], b.shape[1]
        ad, bd = a.to(dt), b.to(dt)
        xp = xs.new_zeros(E * pad, K).index_copy_(0, dest, xs).view(E, pad, K)  # [E, P, K]
        hp = torch.bmm(xp, ad.transpose(1, 2))  # [E, P, r]
        out = torch.bmm(hp, bd.transpose(1, 2)).view(E * pad, N)  # [E*P, N]
        ctx.save_for_backward(xp, hp, ad, bd, dest)
        ctx.scaling, ctx.dtypes = scaling, (a.dtype, b.dtype)
        return out.index_select(0, dest).mul_(scaling)  # [rows, N]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        xp, hp, ad, bd, dest = ctx.saved_tensors
        E, pad, K = xp.shape
        s = ctx.scaling
        gp = g.new_zeros(E * pad, g.shape[1]).index_copy_(0, dest, g.to(xp.dtype)).view(E, pad, -1)  # [E, P, N]
        db = torch.bmm(gp.transpose(1, 2), hp).mul_(s) if ctx.needs_input_grad[2] else None  # [E, N, r]
        dh = torch.bmm(gp, bd).mul_(s)  # [E, P, r]
        da = torch.bmm(dh.transpose(1, 2), xp) if ctx.needs_input_grad[1] else None  # [E, r, K]
        dx = torch.bmm(dh, ad).view(E * pad, K).index_select(0, dest) if ctx.needs_input_grad[0] else None
        return (dx, None if da is None else da.to(ctx.dtypes[0]), None if db is None else db.to(ctx.dtypes[1]),
                None, None, None, None)
