"""Causal attention on the kernel the policy chooses (``frugallm.kernels.policy``): SDPA, SDPA with v
padded for the CPU's flash kernel, or, training in float32 on the CPU, batched GEMMs over two query blocks
(``_BlockedCausal``), which keep the probabilities the flash kernel recomputes.

Packed rows (several examples in one sequence, ``frugallm.tune.sft``) add a ``SegmentMask``: query t sees
key s only when s <= t and both are in the same segment. Every path takes it: the blocked one adds a
0 / -inf bias per batch row, broadcast over the heads, to the causal blocks it already computes; SDPA gets
one boolean mask [B, 1, S, S]. ``SegmentMask.of`` returns None when the causal mask alone is exact (every
row one example from its start, padding only after it), so unpacked batches do no mask work at all.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from frugallm.kernels.policy import KernelPolicy, query_blocks


class SegmentMask:
    """Which keys each query of a packed batch may see, from segment ids [B, S] (1, 2, ... per example, 0 on
    padding), built once per forward and shared by every layer, which is why the masks are cached here.

    Key s is visible to query t when s <= t and seg[s] == seg[t]. Padding counts as one more segment: no
    real query sees a padding key, and a padding query sees at least itself, so no softmax row is all -inf
    (a NaN there would reach the real tokens' gradients through 0 * NaN); its output is never trained."""

    def __init__(self, segment_ids: torch.Tensor):
        self.ids = segment_ids  # [B, S]
        self._allowed: torch.Tensor | None = None
        self._bias: dict[torch.dtype, torch.Tensor] = {}

    @staticmethod
    def of(segment_ids: torch.Tensor | None) -> SegmentMask | None:
        """The mask of ``segment_ids`` [B, S], or None where plain causal attention is already exact: each row
        one segment from position 0, then only padding (seg = a..a 0..0, the padded batches' shape)."""
        if segment_ids is None:
            return None
        one = ((segment_ids == segment_ids[:, :1]) | (segment_ids == 0)).all()
        ordered = (segment_ids[:, 1:] <= segment_ids[:, :-1]).all()  # the zeros come last
        return None if bool(one & ordered) else SegmentMask(segment_ids)

    def same_segment(self) -> torch.Tensor:
        return self.ids[:, None, :, None] == self.ids[:, None, None, :]  # [B, 1, S(query), S(key)]

    def allowed(self) -> torch.Tensor:
        """[B, 1, S, S] True where query t may attend key s: SDPA's boolean mask, causal included."""
        if self._allowed is None:
            S = self.ids.shape[1]
            causal = torch.ones(S, S, dtype=torch.bool, device=self.ids.device).tril_()  # [S, S]
            self._allowed = self.same_segment() & causal
        return self._allowed

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, S, S] 0 within a segment, -inf across: what the blocked path adds to its causal scores."""
        if dtype not in self._bias:
            zero = torch.zeros((), dtype=dtype, device=self.ids.device)
            self._bias[dtype] = zero.masked_fill(~self.same_segment(), float("-inf"))
        return self._bias[dtype]


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
    (the middle one is softmax's backward, one fused kernel). A segment bias [B, 1, S, S] (``SegmentMask``)
    is added to each block's causal scores in place, one pass over them; the probabilities it zeroes need
    nothing in the backward, whose formulas hold as they are. Allowed scores get + 0, so they equal the
    unmasked path's bit for bit."""

    @staticmethod
    def forward(ctx, q, k, v, scale, segment_bias=None):  # type: ignore[no-untyped-def,override]
        B, h, S, d = q.shape
        q3, k3 = q.reshape(B * h, S, d), k.reshape(B * h, S, d)  # [BH, S, d]
        v3 = v.reshape(B * h, S, v.shape[-1])  # [BH, S, d_v]
        bounds = query_blocks(S)
        mask = torch.full((S, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # [S, S]
        out = q3.new_empty(B * h, S, v.shape[-1])
        probs = []
        for a, b in itertools.pairwise(bounds):
            p = torch.baddbmm(mask[a:b, :b], q3[:, a:b], k3[:, :b].transpose(1, 2), alpha=scale)
            if segment_bias is not None:
                p.view(B, h, b - a, b).add_(segment_bias[:, :, a:b, :b])  # [B, h, b - a, b]
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
        return dq.view(B, -1, S, d), dk.view(B, -1, S, d), dv.view(B, -1, S, dv.shape[-1]), None, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernels: KernelPolicy,
                     q_offset: int = 0, segments: SegmentMask | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with causal masking; q: [B, h, S, d], k: [B, h, T, d], v: [B, h, T, d_v].
    The S queries sit at positions q_offset .. q_offset+S-1 of the T keys. Equal-length self-attention
    takes the policy's path (module doc of ``frugallm.kernels.policy``) where it applies, with ``segments``
    (packed rows) also masking keys of other segments."""
    S, T = q.shape[-2], k.shape[-2]
    if segments is not None and (q_offset != 0 or S != T):
        raise ValueError(f"segment masks are for self-attention over one packed batch, got S={S}, T={T}, "
                         f"q_offset={q_offset}")
    if q_offset == 0 and S == T and _blocked_applies(q, k, v, kernels):
        bias = None if segments is None else segments.bias(q.dtype)
        return _BlockedCausal.apply(q, k, v, scale, bias)
    if q_offset == 0 and S == T:
        mask = None if segments is None else segments.allowed()  # [B, 1, S, S]
        d_v = v.shape[-1]
        if kernels.attention != "sdpa" and q.device.type == "cpu" and d_v < q.shape[-1]:
            # zero columns of v cost less than SDPA's math path (the policy's module doc); the CPU's flash
            # kernel takes the boolean mask as well
            v = F.pad(v, (0, q.shape[-1] - d_v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=scale)[..., :d_v]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(diagonal=q_offset)  # [S, T]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
