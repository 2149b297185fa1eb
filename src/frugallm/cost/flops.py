"""FLOPs per token from the matmul shapes of a ``ModelConfig``.

Symbols (DeepSeek-V3 sizes in brackets): H hidden [7168], V vocabulary [129,280], L layers [61],
n_h heads [128], d_qk = d_n + d_r query/key head dim [192], d_v value head dim [128], r_kv latent [512],
S sequence length, T keys a query attends to, D MTP depth [1].

Counting rules
- A matmul [m, n] x [n, p] costs 2*m*n*p FLOPs (one multiply and one add per MAC). Elementwise work
  (norms, RoPE, softmax, SiLU, gating, residual adds) is not counted: it is a fraction of a percent at
  these widths, and neither MFU conventions nor PyTorch's ``FlopCounterMode`` count it.
- Weights: every weight matrix a token passes through costs 2 * rows * cols per token. That is the
  classic "2N per token", made exact by listing the matrices (``params.weight_matrices``): the embedding
  is a lookup (0 FLOPs), a tied output head still costs 2*H*V, a token reaches only k of the E routed
  experts, and the router's [E, H] scoring matmul is counted.
- Attention per layer and token: scores q k^T cost 2*n_h*d_qk*T and the weighted sum of values
  2*n_h*d_v*T. With ``causal=True`` (the default) T is the mean number of keys a query may see,
  (S + 1) / 2 for a sequence of S: that is the work the model needs and what FlashAttention-style kernels
  do, as they skip masked blocks. With ``causal=False`` T = S, the full S x S square, which is what
  PyTorch's math attention kernel computes, what ``FlopCounterMode`` counts, and the convention of the
  PaLM MFU formula (6N + 12*L*H*S). At S = 4096 the difference is about 11% of DeepSeek-V3's training FLOPs.
- Training = forward + backward = 3 x forward. For y = x W the backward computes dx = dy W^T and
  dW = x^T dy, each as costly as the forward; attention's backward (dP = dO V^T, dV = P^T dO,
  dQ = dS K, dK = dS^T Q) is likewise twice its forward. The input gradient of the first layer is
  needed too, because the embedding is trained, so the factor is exactly 3 (verified with
  ``FlopCounterMode`` in tests/test_cost_flops.py).
- MTP (``forward_train``): each of the D modules runs ``eh_proj`` [H, 2H], one decoder block with full
  attention over S, and the shared output head, for every position.

``six_n_estimate`` is the common 6 * N_active (N without the embedding) for comparison: it leaves out
attention over the context and the MTP modules.
"""

from __future__ import annotations

from frugallm.config import ModelConfig
from frugallm.cost.params import param_counts, weight_matrices
from frugallm.errors import ConfigError

BREAKDOWN_KEYS = ("attention_projections", "attention_scores", "attention_values", "router", "dense_ffn",
                  "shared_experts", "routed_experts", "output_head", "mtp")
_PART_KEY = {"attention": "attention_projections", "router": "router", "dense_ffn": "dense_ffn",
             "shared_expert": "shared_experts", "routed_expert": "routed_experts", "head": "output_head"}


def _check_len(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _keys_per_query(seq_len: int, causal: bool) -> float:
    """Mean keys a query attends to: sum_{i=1..S} i / S = (S+1)/2 under a causal mask, else S."""
    return (seq_len + 1) / 2 if causal else float(seq_len)


def attention_score_flops(cfg: ModelConfig, keys: float) -> tuple[float, float]:
    """(scores, values) FLOPs of one layer for one query attending to ``keys`` keys, expanded heads:
    2*n_h*d_qk*T for q k^T and 2*n_h*d_v*T for P v (MLA rebuilds per-head K and V from the latent, so
    its expanded path has MHA's shape; GQA repeats its n_kv heads to n_h before attending)."""
    nh = cfg.num_attention_heads
    return 2 * nh * cfg.qk_head_dim * keys, 2 * nh * cfg.v_head_dim * keys


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int, *, causal: bool = True,
                            include_mtp: bool = False) -> dict[str, float]:
    """Forward FLOPs per token by component (``BREAKDOWN_KEYS``), for a sequence of ``seq_len`` tokens
    with logits at every position (training, or ``model(input_ids)``). ``mtp`` holds everything the
    MTP modules add (their projection, block, attention and their use of the shared head)."""
    _check_len("seq_len", seq_len)
    out = dict.fromkeys(BREAKDOWN_KEYS, 0.0)
    head = 2 * cfg.hidden_size * cfg.vocab_size  # also when tied: the matmul runs either way
    for m in weight_matrices(cfg):
        if m.part in ("embedding", "head"):
            continue
        if m.mtp:
            out["mtp"] += 2 * m.active_numel if include_mtp else 0
        else:
            out[_PART_KEY[m.part]] += 2 * m.active_numel
    out["output_head"] = head
    scores, values = attention_score_flops(cfg, _keys_per_query(seq_len, causal))
    out["attention_scores"] = cfg.num_hidden_layers * scores
    out["attention_values"] = cfg.num_hidden_layers * values
    if include_mtp:
        out["mtp"] += cfg.num_nextn_predict_layers * (scores + values + head)
    return out


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True,
                            include_mtp: bool = False) -> float:
    """Forward FLOPs per token of a ``seq_len`` sequence; ``include_mtp`` adds the MTP modules as
    ``forward_train`` runs them (``model(input_ids)`` does not)."""
    return sum(forward_flops_breakdown(cfg, seq_len, causal=causal, include_mtp=include_mtp).values())


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True,
                          include_mtp: bool = True) -> float:
    """Forward + backward FLOPs per trained token: 3 x the forward of ``forward_train`` (MTP included)."""
    return 3 * forward_flops_per_token(cfg, seq_len, causal=causal, include_mtp=include_mtp)


def six_n_estimate(cfg: ModelConfig) -> int:
    """6 * N_active per token, N_active without the embedding (Kaplan et al. 2020, arXiv 2001.08361): the
    common rule of thumb, shown next to the exact count. No attention over the context, no MTP."""
    return 6 * param_counts(cfg).active_non_embedding


# ----- inference ----------------------------------------------------------------------------------------
def _trunk_projection_flops(cfg: ModelConfig) -> float:
    """Per-token weight FLOPs of the main model's blocks (no head, no MTP, no attention over keys)."""
    return sum(2 * m.active_numel for m in weight_matrices(cfg)
               if not m.mtp and m.part not in ("embedding", "head"))


def prefill_flops_per_token(cfg: ModelConfig, context_len: int, *, causal: bool = True) -> float:
    """Prefill FLOPs per prompt token for a prompt of ``context_len`` tokens: every token goes through the
    blocks with causal attention over the prompt (MLA on its expanded path), and the output head runs
    once, for the last position only, so its cost is shared by the prompt."""
    _check_len("context_len", context_len)
    scores, values = attention_score_flops(cfg, _keys_per_query(context_len, causal))
    head = 2 * cfg.hidden_size * cfg.vocab_size
    return _trunk_projection_flops(cfg) + cfg.num_hidden_layers * (scores + values) + head / context_len


def decode_flops_per_token(cfg: ModelConfig, context_len: int, *, absorbed: bool = True) -> float:
    """FLOPs to generate one token that attends to ``context_len`` cached tokens (itself included).

    MHA/GQA: the weight FLOPs plus 2*n_h*(d_qk + d_v)*T over the cache.
    MLA absorbed (``absorbed=True``, the serving path in DeepSeek-V2 section 2.1.2 and vLLM's MLA backend):
    W_UK is folded into the query (2*n_h*d_n*r_kv) and W_UV applied after attention (2*n_h*r_kv*d_v),
    which costs what kv_b_proj costs on one token, and attention runs over the cached latent and rope key:
    2*n_h*(r_kv + d_r)*T for scores and 2*n_h*r_kv*T for values.
    MLA expanded (``absorbed=False``): K and V are rebuilt from the whole cached latent at every step
    (what transformers' DeepseekV3 does), 2*r_kv*n_h*(d_n + d_v)*T, then attention with d_qk and d_v.
    The output head runs once per generated token."""
    _check_len("context_len", context_len)
    T = context_len
    nh = cfg.num_attention_heads
    per_layer_attn: float
    if cfg.attention == "mla" and absorbed:
        per_layer_attn = 2 * nh * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * T + 2 * nh * cfg.kv_lora_rank * T
    else:
        scores, values = attention_score_flops(cfg, T)
        per_layer_attn = scores + values
        if cfg.attention == "mla":
            rebuild = 2 * cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            per_layer_attn += rebuild * (T - 1)  # the new token's own expansion is in the trunk already
    head = 2 * cfg.hidden_size * cfg.vocab_size
    return _trunk_projection_flops(cfg) + cfg.num_hidden_layers * per_layer_attn + head


__all__ = ["BREAKDOWN_KEYS", "attention_score_flops", "decode_flops_per_token", "forward_flops_breakdown",
           "forward_flops_per_token", "prefill_flops_per_token", "six_n_estimate", "train_flops_per_token"]
