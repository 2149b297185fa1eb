"""Output head and cross-entropy in one pass, chunked over tokens, with the gradients made in the forward.

The plain path materialises the logits [N, V] (at the ``tiny`` shape 4,096 x 8,192 float32 = 128 MiB), keeps
them for backward, then walks them again for the softmax gradient. Here each chunk of C rows computes
    z = h_c W^T                     [C, V]   (the only GEMM of the forward)
    lse = logsumexp(z),  loss_c = sum(lse - z[label])
    dz = (softmax(z) - onehot(label)) / n_valid                    zero on ignored rows
    dh_c = dz W,   dW += dz^T h_c                                  (the two GEMMs of the backward)
while z is still in cache, and keeps only dh [N, H] and dW [V, H] for backward, which scales them by the
incoming gradient. Same three GEMMs as the plain path, no [N, V] tensor alive, no second walk over logits.
The numerics equal ``F.cross_entropy(h @ W.T, labels)`` (float32 softmax, mean over non-ignored labels);
``reduction="sum"`` returns the sum instead (n_valid above is then 1), for callers that weight by tokens
across batches of different sizes (packed SFT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from frugallm.kernels import KernelPolicy, gemm

REDUCTIONS = ("mean", "sum")
CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in float32; 512 rows at V = 8,192): as fast as one chunk here
# The output head's GEMMs follow the kernel policy (``frugallm.kernels``): on the CPU the logits GEMM of a
# chunk runs over vocabulary blocks (``vocab_block``) into one buffer that all chunks share, and where the
# training GEMMs run on oneDNN the logits and dh GEMMs do too, each chunk's logits into a fresh tensor
# (oneDNN writes no caller's buffer): 120 ms against 137 for the blocked MKL GEMMs into the shared buffer,
# softmax included, at the tiny shape on the AVX-512 EPYC.


def _logits(hc: torch.Tensor, w: torch.Tensor, out: torch.Tensor, low: torch.Tensor | None,
            block: int | None) -> torch.Tensor:
    """hc [C, H] @ w[V, H]^T written into ``out`` [>=C, V] (a buffer the chunks share, so that its pages
    are touched once per step rather than once per chunk) -> out[:C], over vocabulary blocks of ``block``
    rows of w where given. A low-precision product goes through ``low`` [>=C, V] in hc's dtype, also
    shared, and is widened into ``out``."""
    z = out[: hc.shape[0]]
    V = w.shape[0]
    if hc.dtype != out.dtype:
        return z.copy_(hc @ w.T if low is None else torch.mm(hc, w.T, out=low[: hc.shape[0]]))
    if block is None or V <= block:
        return torch.mm(hc, w.T, out=z)
    for v in range(0, V, block):
        torch.mm(hc, w[v : v + block].T, out=z[:, v : v + block])
    return z


def _softmax_nll(z: torch.Tensor, lab: torch.Tensor, hc: torch.Tensor, w: torch.Tensor,
                 scale: torch.Tensor | None) -> torch.Tensor:
    """Logits z [C, V] (float32 or wider) of rows hc [C, H] -> -log softmax(z)[label] [C]; z is overwritten,
    with softmax(z) * scale [C, 1] when ``scale`` is given (the gradient's first term).

    On the CPU through PyTorch's row-wise softmax kernel, in place: it finishes each row while the row is in
    cache, one pass over the chunk where max, subtract-exp, sum and scale take four (the head's softmax in a
    third less time here). The loss is then -log p[label], exact while p[label] is a normal float; the rare
    rows below that (a loss above 87) get their log-sum-exp from their logits, recomputed."""
    if z.device.type != "cpu":
        picked = z.gather(1, lab[:, None]).squeeze(1)  # [C]
        peak = z.amax(dim=-1, keepdim=True)  # [C, 1]
        p = z.sub_(peak).exp_()  # exp(z - max), in place of z
        norm = p.sum(dim=-1, keepdim=True)  # [C, 1]
        if scale is not None:
            p.mul_(scale / norm)
        return (peak + norm.log()).squeeze(1) - picked
    torch.ops.aten._softmax.out(z, -1, False, out=z)
    p_lab = z.gather(1, lab[:, None]).squeeze(1)  # [C]
    nll = p_lab.log().neg_()
    low = p_lab < torch.finfo(p_lab.dtype).tiny
    if low.any():
        rows = low.nonzero().squeeze(1)
        zr = (hc.index_select(0, rows) @ w.T).to(z.dtype)  # [r, V] those rows' logits, as _logits made them
        nll[rows] = zr.logsumexp(-1) - zr.gather(1, lab[rows, None]).squeeze(1)
    if scale is not None:
        z.mul_(scale)
    return nll


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,  # type: ignore[override]
                ignore_index: int, need_dh: bool, need_dw: bool, kernels: KernelPolicy,
                mean: bool = True) -> torch.Tensor:
        dtype = _compute_dtype(h)
        with torch.autocast(device_type=h.device.type, enabled=False):
            hc_all, w = h.to(dtype), weight.to(dtype)
            N, V = h.shape[0], weight.shape[0]
            valid = labels != ignore_index
            acc = torch.promote_types(dtype, torch.float32)  # softmax and accumulation: float32 at least
            # the divisor of the loss and of its gradient: 1 for a sum
            n_valid = valid.sum().clamp(min=1).to(acc) if mean else torch.ones((), dtype=acc, device=h.device)
            safe = torch.where(valid, labels, 0)
            chunk = max(1, CHUNK_ELEMENTS // V)
            total = torch.zeros((), dtype=acc, device=h.device)
            grads = need_dh or need_dw
            block = kernels.vocab_block
            onednn = gemm.onednn_applies(hc_all, w, kernels, training=grads)
            rows = min(chunk, N)
            z_buf = None if onednn else torch.empty(rows, V, dtype=acc, device=h.device)
            dh = torch.empty(h.shape, dtype=acc, device=h.device) if need_dh else None
            dw = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_dw else None
            # low precision: the chunk's logits and dz, and its weight gradient before and after widening, in
            # buffers every chunk reuses: fresh ones, 8 MiB each at the tiny shape, made their copies 2-3x
            # slower in a profile of the bf16 step on the CPU; the step itself is 1-2% faster with these
            low = None if dtype == acc else torch.empty(rows, V, dtype=dtype, device=h.device)
            dw_low = torch.empty(weight.shape, dtype=dtype, device=h.device) if need_dw and low is not None else None
            dw_wide = torch.empty_like(dw) if dw_low is not None else None
            for s in range(0, N, chunk):
                hc = hc_all[s : s + chunk]  # [C, H]
                if onednn:
                    z = gemm.nt(hc, w, kernels, training=True)  # [C, V]
                else:
                    z = _logits(hc, w, z_buf, low, block)  # [C, V]
                lab, ok = safe[s : s + chunk], valid[s : s + chunk]
                weight_row = ok.to(z.dtype)[:, None] / n_valid if grads else None  # [C, 1] 0 on ignored rows
                total += (_softmax_nll(z, lab, hc, w, weight_row) * ok).sum()  # z: softmax / n_valid
                if not grads:
                    continue
                z.scatter_add_(1, lab[:, None], -weight_row)  # minus the one-hot label: dz
                dzc = z if low is None else low[: z.shape[0]].copy_(z)
                if dh is not None:
                    dh[s : s + chunk] = gemm.nt(dzc, w.t(), kernels, training=True) if onednn else dzc @ w
                if dw is not None:
                    if dw_low is None:
                        dw.addmm_(dzc.T, hc)
                    else:  # low-precision GEMM, float32 accumulation across chunks
                        dw.add_(dw_wide.copy_(torch.mm(dzc.T, hc, out=dw_low)))
        ctx.save_for_backward(*(t for t in (dh, dw) if t is not None))
        ctx.has = (dh is not None, dw is not None)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        dh = next(saved) * grad if ctx.has[0] else None
        dw = next(saved) * grad if ctx.has[1] else None
        return (dh.to(ctx.dtypes[0]) if dh is not None else None,
                dw.to(ctx.dtypes[1]) if dw is not None else None, None, None, None, None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         kernels: KernelPolicy = KernelPolicy(), reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``h [..., H] @ weight[V, H]^T`` against ``labels [...]``, the mean over the labels that
    are not ``ignore_index`` (or their sum, ``reduction="sum"``), without keeping the logits, its GEMMs as
    ``kernels`` chooses. Falls back to the plain path for tensor subclasses (FSDP's DTensor weights, FP8
    wrappers)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    h2, lab = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    if type(weight) is not torch.nn.Parameter and type(weight) is not torch.Tensor:
        return F.cross_entropy(F.linear(h2, weight).float(), lab, ignore_index=ignore_index, reduction=reduction)
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h2, weight, lab, ignore_index, grad and h.requires_grad,
                                     grad and weight.requires_grad, kernels, reduction == "mean")
