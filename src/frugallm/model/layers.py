"""Small building blocks shared by attention, MoE and the transformer: the linear layer, RMSNorm and the
SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frugallm.kernels import KernelPolicy
from frugallm.kernels.gemm import linear


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and state_dict) whose GEMMs run on the library its kernel
    policy chooses (``frugallm.kernels.gemm``); ``build_model`` gives it the model's policy."""

    kernels = KernelPolicy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.kernels)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the input dtype, as DeepSeek keeps normalisation in high
    precision (V3 report, section 3.3.1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.eps)
        # no backward (serving, evaluation): torch's fused op, the same formula (its mean of squares rounds
        # in another order, within an ulp), at a fraction of an autograd Function's per-call cost
        up = x.to(torch.promote_types(x.dtype, torch.float32))
        if up.dtype == x.dtype == self.weight.dtype:
            return torch.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return self.weight * torch.rms_norm(up, x.shape[-1:], None, self.eps).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """y = w * xhat with xhat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), in at least float32. The backward
    is written out: with t = g xhat, dw = sum over rows of t, and dx = rstd * (g w - xhat * (t . w) / H),
    where the row dot product t . w is one matrix-vector product. Three passes over the activation forward
    and five backward, where autograd through the composite takes about twice as many."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # type: ignore[no-untyped-def,override]
        up = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32, never a downcast
        ms = torch.linalg.vector_norm(up, dim=-1, keepdim=True).square_().div_(up.shape[-1])  # mean(x^2)
        rstd = ms.add_(eps).rsqrt_()  # [..., 1]
        xhat = up * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.x_dtype = x.dtype
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def,override]
        xhat, rstd, weight = ctx.saved_tensors
        gf, wf = g.to(xhat.dtype), weight.to(xhat.dtype)
        t = gf * xhat
        dw = t.flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        c = (t @ wf).unsqueeze(-1).div_(xhat.shape[-1])  # [..., 1] mean(g w xhat) per row
        dx = torch.addcmul(gf * wf, xhat, c, value=-1).mul_(rstd)
        return dx.to(ctx.x_dtype), (dw.to(weight.dtype) if dw is not None else None), None


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for h = [g | u] along the last dim ([..., 2I] -> [..., I]), as one autograd node whose
    backward writes both halves of dh in place: autograd through chunk, silu and mul ends in a cat of the
    two halves, an extra pass over [..., 2I] for every expert and MLP."""
    return _SwiGLU.apply(h)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):  # type: ignore[no-untyped-def,override]
        g, u = h.chunk(2, dim=-1)
        s = F.silu(g)
        ctx.save_for_backward(h, s)  # what autograd keeps for chunk + silu + mul: h (g and u) and silu(g)
        return s * u

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def,override]
        h, s = ctx.saved_tensors
        g, u = h.chunk(2, dim=-1)
        dh = torch.empty_like(h, memory_format=torch.contiguous_format)
        dg, du = dh.chunk(2, dim=-1)
        torch.mul(grad, s, out=du)
        torch.ops.aten.silu_backward.grad_input(grad * u, g, grad_input=dg)
        return dh


def fuse_linears(*linears: nn.Module) -> bool:
    """Whether linears that read the same input should run as one GEMM over their concatenated weights: when
    training (the fused backward is one input-gradient GEMM instead of one per linear and their sum) and all
    are plain linears (not converted to FP8, not sharded). Not under no_grad: serving would copy the
    weights on every decode step (at DeepSeek-V3 size 0.5 GB per dense layer) to save nothing."""
    plain = (nn.Linear, Linear)
    return torch.is_grad_enabled() and all(type(m) in plain and m.weight.requires_grad for m in linears)


def project_together(x: torch.Tensor, *linears: nn.Module, plain: bool = True) -> torch.Tensor | None:
    """x [*, K] through linears that all read it, as one output [*, N_1 + ... + N_n] (their outputs side by
    side), or None where they cannot run together and the caller runs each. Plain linears fuse where
    ``fuse_linears`` says. A wrapper class (LoRA's) fuses its own kind by defining a classmethod
    ``project_together(x, modules)`` with the same contract; the model finds it on the modules, so it
    knows no wrapper. Linears of different classes never fuse. ``plain=False``: only wrappers fuse (a
    plain trained pair would save a concatenated copy of its weights, which ``cost.memory`` counts for
    gate/up only)."""
    kind = type(linears[0])
    if any(type(m) is not kind for m in linears):
        return None
    fused = getattr(kind, "project_together", None)
    if fused is not None:
        return fused(x, linears)
    if plain and fuse_linears(*linears):
        # one GEMM over the concatenated weights: its backward is one input-gradient GEMM, not n GEMMs and
        # their sum
        return linear(x, torch.cat([m.weight for m in linears]), None, linears[0].kernels)
    return None


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``. Used for dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj, self.up_proj
        gate_up = project_together(x, gate, up)  # [*, 2I] or None
        if gate_up is not None:
            return self.down_proj(swiglu(gate_up))
        return self.down_proj(F.silu(gate(x)) * up(x))
