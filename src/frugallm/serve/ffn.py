"""The FFN half of a block as the serving step runs it: the same modules and weights as ``DecoderLayer.ffn``,
without what only training needs.

- No balance statistics: the MoE's sequence-wise balance loss and expert load are training signals; at
  inference computing them is a dozen operators per MoE layer per step for nothing.
- Few tokens, few experts: a decode step brings B (or 2B when verifying a draft) tokens, so at small batch
  only N*k of the E routed experts have any row. ``GroupedExperts.forward`` sorts the N*k (token, expert)
  pairs, splits them into E slices and permutes them back, which costs the same operators whether an expert
  got rows or not; here each expert that was chosen runs once on its tokens, and its output is added into
  its tokens' rows scaled by their gates. Used on the CPU, for the plain stacked experts (``GroupedExperts``
  itself: LoRA and FP8 experts keep their own ``project``), when N*k <= E; otherwise, and on GPUs (where
  reading the routing back to the host would stall the stream), the module's own grouped path runs.
- The dense MLP and the shared experts as ``down(silu(gate(x)) * up(x))``: ``MLP.forward`` concatenates
  gate and up into one weight on every call so that training's backward is one GEMM; without a backward
  that copy of the weights buys nothing.

The results equal ``DecoderLayer.ffn``'s up to float rounding (the gates' weighted sum is accumulated in
another order); tests compare them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from frugallm.model.block import DecoderLayer
from frugallm.model.layers import MLP, swiglu
from frugallm.model.moe import GroupedExperts, MoE


def ffn_half(layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H] -> x + FFN(norm(x)), as ``DecoderLayer.ffn`` without its statistics."""
    h = layer.post_attention_layernorm(x)
    mlp = layer.mlp
    return x + (moe_infer(mlp, h) if isinstance(mlp, MoE) else mlp_infer(mlp, h))


def mlp_infer(mlp: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    if type(mlp) is MLP:  # its linears may be wrapped (adapters): they are called as modules
        return mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    return mlp(h)


def moe_infer(moe: MoE, h: torch.Tensor) -> torch.Tensor:
    """h [B, S, H] -> the MoE's output [B, S, H] (routed experts plus shared experts)."""
    B, S, H = h.shape
    flat = h.reshape(B * S, H)  # [N, H]
    route = moe.gate(flat)
    experts = moe.experts
    N, k = route.indices.shape
    if type(experts) is GroupedExperts and flat.device.type == "cpu" and N * k <= experts.n_experts:
        out = _chosen_experts(experts, flat, route.indices, route.gates)
    else:
        out = experts(flat, route.indices, route.gates)
    out = out.view(B, S, H)
    if moe.shared_experts is not None:
        out = out + mlp_infer(moe.shared_experts, h)
    return out


def _chosen_experts(experts: GroupedExperts, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor
                    ) -> torch.Tensor:
    """sum_j gates[t, j] * expert_{indices[t, j]}(x[t]) for every token t (x [N, H], indices/gates [N, k]),
    running each chosen expert once on the tokens that chose it -> [N, H]."""
    dtype = experts.compute_dtype(x)
    xs = x.to(dtype)
    chosen: dict[int, list[tuple[int, float]]] = {}
    for t, (row, g_row) in enumerate(zip(indices.tolist(), gates.tolist(), strict=True)):
        for e, g in zip(row, g_row, strict=True):
            chosen.setdefault(e, []).append((t, g))
    out = torch.zeros(x.shape[0], experts.hidden, dtype=dtype, device=x.device)  # [N, H]
    for e, pairs in chosen.items():
        w_gu, w_d = experts.gate_up_proj[e].to(dtype), experts.down_proj[e].to(dtype)  # [2I, H], [H, I]
        if len(pairs) == 1:
            t, g = pairs[0]
            y = F.linear(swiglu(F.linear(xs[t : t + 1], w_gu)), w_d)  # [1, H]
            out[t].add_(y[0], alpha=g)
        else:
            rows = torch.tensor([t for t, _ in pairs], device=x.device)
            y = F.linear(swiglu(F.linear(xs.index_select(0, rows), w_gu)), w_d)  # [m, H]
            out.index_add_(0, rows, y * torch.tensor([g for _, g in pairs], dtype=dtype, device=x.device)[:, None])
    return out.to(x.dtype)
