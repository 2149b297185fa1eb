"""The routed experts' kernel choices (``frugallm.kernels.policy``): one grouped GEMM on CUDA, and on the
CPU, where bf16 and fp16 GEMMs run on oneDNN and oneDNN builds (JIT-compiles) a kernel for every new
problem shape, each expert's rows padded with zero rows up to one of a few bucket sizes (``bucket_rows``)
so that its kernels are reused. Zero rows add nothing to the outputs of the real rows or to the weight
gradients; the padded rows' gradients are dropped."""

from __future__ import annotations

import torch

from frugallm.kernels.policy import KernelPolicy, bucket_rows


def grouped_mm_applies(xs: torch.Tensor, kernels: KernelPolicy) -> bool:
    """Whether the experts run as one ``torch._grouped_mm`` (the policy's choice, bf16 CUDA tensors)."""
    return (kernels.grouped_mm and hasattr(torch, "_grouped_mm") and xs.dtype == torch.bfloat16
            and xs.device.type == "cuda" and xs.shape[0] > 0)


def to_buckets(xs: torch.Tensor, counts: torch.Tensor, kernels: KernelPolicy
               ) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """xs [M, H] sorted by expert with counts [E] -> (rows, sizes per expert, row map): where the policy pads
    (bf16 or fp16 on the CPU) the rows laid out in bucket-sized slices and the map of each real row to its
    padded row, else xs, the counts and None. ``from_buckets`` undoes it on the experts' outputs."""
    if not (kernels.pads_expert_rows(xs.element_size()) and xs.device.type == "cpu" and xs.shape[0] > 0
            and xs.is_floating_point()):
        return xs, counts.tolist(), None
    return bucketed(xs, counts)


def bucketed(xs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """``to_buckets``' padding, whatever the dtype."""
    sizes = [bucket_rows(m) for m in counts.tolist()]
    padded = torch.tensor(sizes, device=xs.device)
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # [E] each expert's start moves by this
    dest = torch.arange(xs.shape[0], device=xs.device) + shift.repeat_interleave(counts)  # [M] row -> padded
    return _ToPadded.apply(xs, dest, sum(sizes)), sizes, dest


def from_buckets(ys: torch.Tensor, dest: torch.Tensor | None) -> torch.Tensor:
    """The real rows of the experts' outputs ys [rows, H] -> [M, H] (ys itself when nothing was padded)."""
    return ys if dest is None else _FromPadded.apply(ys, dest)


class _ToPadded(torch.autograd.Function):
    """Rows of x placed at rows ``dest`` of a zero [rows, H]; the gradient gathers them back."""

    @staticmethod
    def forward(ctx, x, dest, rows):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(dest)
        return x.new_zeros(rows, x.shape[1]).index_copy_(0, dest, x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        (dest,) = ctx.saved_tensors
        return g.index_select(0, dest), None, None


class _FromPadded(torch.autograd.Function):
    """Rows ``dest`` of y; the padding rows get a zero gradient."""

    @staticmethod
    def forward(ctx, y, dest):  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(dest)
        ctx.rows = y.shape[0]
        return y.index_select(0, dest)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        (dest,) = ctx.saved_tensors
        return g.new_zeros(ctx.rows, g.shape[1]).index_copy_(0, dest, g), None
