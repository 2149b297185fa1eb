"""Causal attention on the kernel the policy chooses (``frugallm.kernels.policy``): SDPA, SDPA with v
padded for the CPU's flash kernel, or, training in float32 on the CPU, batched GEMMs over two query blocks
(``_BlockedCausal``), which keep the probabilities the flash kernel recomputes."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from frugallm.kernels.policy import KernelPolicy, query_blocks


def _blocked_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernels: KernelPolicy) -> bool:
    B, h, S, _ = q.shape
    return (q.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and any(t.requires_grad for t in (q, k, v))
            and all(type(t) is torch.Tensor and t.dtype in (torch.float32, torch.float64) for t in (q, k, v))
            and k.dtype == q.dtype and v.dtype == q.dtype
            and kernels.attention_path(B, h, S, q.element_size()) == "blocked")


class _BlockedCausal(torch.autograd.Function):
    """Causal softmax(q k^T * scale) v as batched GEMMs in two query blocks: block [a, b) scores its queries
    against keys [0, b) only, so 3/4 of the [S, S] scores are computed where a plain math path computes
    them all, and the first block's masked half is never formed. Runs in the inputs' dtype (float32 or
    float64, as ``_blocked_applies`` admits). Keeps each block's probabilities P for backward, where with dO
    the output's gradient, per block:
        dV += P^T dO,   dS = P * (dO V^T - rowsum(P * dO V^T)),   dQ = scale dS K,   dK += scale dS^T Q
    (the middle one is softmax's backward, one fused kernel)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):  # type: ignore[no-untyped-def,override]
        B, h, S, d = q.shape
        q3, k3 = q.reshape(B * h, S, d), k.reshape(B * h, S, d)  # [BH, S, d]
        v3 = v.reshape(B * h, S, v.shape[-1])  # [BH, S, d_v]
        bounds = query_blocks(S)
        mask = torch.full((S, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # [S, S]
        out = q3.new_empty(B * h, S, v.shape[-1])
        probs = []
        for a, b in itertools.pairwise(bounds):
            p = torch.baddbmm(mask[a:b, :b], q3[:, a:b], k3[:, :b].transpose(1, 2), alpha=scale)
            torch.ops.aten._softmax.out(p, -1, False, out=p)  # [BH, b - a, b], in place
            torch.bmm(p, v3[:, :b], out=out[:, a:b])
            probs.append(p)
        ctx.save_for_backward(q3, k3, v3, *probs)
        ctx.scale, ctx.bounds = scale, bounds
        return out.view(B, h, S, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):  # type: ignore[no-untyped-def,override]
        q3, k3, v3, *probs = ctx.saved_tensors
        bounds, scale = ctx.bounds, ctx.scale
        BH, S, d = q3.shape
        B = dout.shape[0]
        do3 = dout.reshape(BH, S, -1)  # [BH, S, d_v]
        v_t = v3.transpose(1, 2).contiguous()  # [BH, d_v, S]: dO V^T reads it row-major
        dq = torch.empty_like(q3)
        dk = dv = None
        for i in reversed(range(len(probs))):  # the last block sees every key: it sizes dk and dv
            a, b = bounds[i], bounds[i + 1]
            p, do_i = probs[i], do3[:, a:b]
            gv = torch.bmm(p.transpose(1, 2), do_i)  # [BH, b, d_v]
            ds = torch._softmax_backward_data(torch.bmm(do_i, v_t[:, :, :b]), p, -1, p.dtype)
            torch.bmm(ds, k3[:, :b], out=dq[:, a:b])
            gk = torch.bmm(ds.transpose(1, 2), q3[:, a:b])  # [BH, b, d]
            if dk is None:
                dk, dv = gk, gv
            else:
                dk[:, :b] += gk
                dv[:, :b] += gv
        dq.mul_(scale)
        dk.mul_(scale)
        return dq.view(B, -1, S, d), dk.view(B, -1, S, d), dv.view(B, -1, S, dv.shape[-1]), None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernels: KernelPolicy,
                     q_offset: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale) v with causal masking; q: [B, h, S, d], k: [B, h, T, d], v: [B, h, T, d_v].
    The S queries sit at positions q_offset .. q_offset+S-1 of the T keys. Equal-length self-attention
    takes the policy's path (module doc of ``frugallm.kernels.policy``) where it applies."""
    S, T = q.shape[-2], k.shape[-2]
    if q_offset == 0 and S == T and _blocked_applies(q, k, v, kernels):
        return _BlockedCausal.apply(q, k, v, scale)
    if q_offset == 0 and S == T:
        d_v = v.shape[-1]
        if kernels.attention != "sdpa" and q.device.type == "cpu" and d_v < q.shape[-1]:
            # zero columns of v cost less than SDPA's math path (the policy's module doc)
            v = F.pad(v, (0, q.shape[-1] - d_v))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :d_v]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)  # [S, T]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
