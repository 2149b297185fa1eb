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
- More tokens than experts (N*k > E: batched decoding, verification of many rows, rollouts): every expert
  runs in one batched GEMM per projection over the stacked weights, each expert's rows padded to the
  busiest expert's count (``_padded_experts``), when that padding at most doubles the rows or stays
  within 8 rows per expert. Three GEMM
  calls and a dozen indexing operators per layer in place of two GEMMs and four indexing operators per
  expert; at 16 decode streams on ``tiny`` that is about a third of the step's operators.
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
    plain = type(experts) is GroupedExperts and flat.device.type == "cpu"
    if plain and N * k <= experts.n_experts:
        out = _chosen_experts(experts, flat, route.indices, route.gates)
    elif plain and (padded := _padded_experts(experts, flat, route.indices, route.gates)) is not None:
        out = padded
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


PAD_ROWS = 8  # rows per expert the padded batch may always hold


def _padded_experts(experts: GroupedExperts, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor
                    ) -> torch.Tensor | None:
    """The same sum as ``_chosen_experts`` (x [N, H], indices/gates [N, k] -> [N, H]) with every expert's
    (token, expert) pairs laid out in a [E, m, H] batch, m the largest expert's count, the empty places
    pointing at a zero row: gate-up and down are one ``bmm`` each over the stacked weights [E, 2I, H] and
    [E, H, I]. None when the padding would more than double the rows and exceed ``PAD_ROWS`` per expert (a
    very uneven routing of many tokens), so that the module's own grouped path runs instead: at a few rows
    per expert the GEMMs cost their weight reads, whatever the padding."""
    N, k = indices.shape
    E = experts.n_experts
    flat = indices.reshape(-1)  # [P] pair p = t*k + j
    P = flat.numel()
    counts = torch.bincount(flat, minlength=E)  # [E]
    m = int(counts.max())
    if E * m > max(2 * P, PAD_ROWS * E):
        return None
    dtype = experts.compute_dtype(x)
    order = flat.argsort(stable=True)  # pairs sorted by expert
    by_expert = flat[order]
    rank = torch.arange(P, device=x.device) - (torch.cumsum(counts, 0) - counts)[by_expert]  # place in its expert
    slot = torch.full((E, m), P, dtype=torch.long, device=x.device)  # P: the zero row
    slot[by_expert, rank] = order
    rows = torch.cat([x.to(dtype).repeat_interleave(k, 0), x.new_zeros(1, x.shape[1], dtype=dtype)])  # [P+1, H]
    batch = rows[slot]  # [E, m, H]
    h = torch.bmm(batch, experts.gate_up_proj.to(dtype).transpose(1, 2))  # [E, m, 2I]
    y = torch.bmm(swiglu(h), experts.down_proj.to(dtype).transpose(1, 2))  # [E, m, H]
    g = torch.cat([gates.reshape(-1).to(dtype), gates.new_zeros(1, dtype=dtype)])[slot]  # [E, m]
    out = torch.zeros(P + 1, x.shape[1], dtype=dtype, device=x.device)
    out.index_copy_(0, slot.flatten(), (y * g[..., None]).flatten(0, 1))  # the padding all lands on row P
    return out[:P].view(N, k, -1).sum(1).to(x.dtype)
