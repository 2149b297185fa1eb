"""Parameter counts from the configuration alone, the single implementation used by the model's
``info`` output, the FLOP model and the memory model. Tests check every count against the ``numel`` of
a model built on the meta device.

Conventions (H hidden, V vocabulary, L layers, E routed experts, k experts per token, I_m expert width):
- MLA attention per layer: q path ``H*r_q + r_q + r_q*n_h*(d_nope+d_rope)`` (or ``H*n_h*(d_nope+d_rope)``
  without query compression), ``H*(r_kv+d_rope) + r_kv`` for the compressed KV and its norm,
  ``r_kv*n_h*(d_nope+d_v)`` to expand it, ``n_h*d_v*H`` for the output.
- MoE layer: router ``E*H``; routed experts ``E*3*H*I_m``; shared experts ``3*H*(n_s*I_m)``.
- Active per token counts the k routed experts a token reaches, everything else in full; the
  embedding is counted (a table lookup, no FLOPs) and also reported apart.
- MTP modules share the embedding and output head with the main model; their own parameters are two
  norms, the ``2H -> H`` projection, one transformer block, and the final norm before the shared head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from frugallm.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    if cfg.attention == "mla":
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            q = H * nh * qk
        else:
            q = H * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * nh * qk
        kv = H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
        kv += cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv + nh * cfg.v_head_dim * H
    nkv = cfg.kv_heads
    return H * nh * cfg.qk_head_dim + H * nkv * (cfg.qk_head_dim + cfg.v_head_dim) + nh * cfg.v_head_dim * H


def dense_ffn_params(cfg: ModelConfig) -> int:
    return 3 * cfg.hidden_size * cfg.intermediate_size


def expert_params(cfg: ModelConfig) -> int:
    """One routed expert (SwiGLU at moe_intermediate_size)."""
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size


def moe_params(cfg: ModelConfig, active: bool = False) -> int:
    routed = (cfg.num_experts_per_tok if active else cfg.n_routed_experts) * expert_params(cfg)
    shared = cfg.n_shared_experts * expert_params(cfg)
    return cfg.n_routed_experts * cfg.hidden_size + routed + shared


def layer_params(cfg: ModelConfig, layer: int, active: bool = False) -> int:
    ffn = moe_params(cfg, active) if cfg.is_moe_layer(layer) else dense_ffn_params(cfg)
    return 2 * cfg.hidden_size + attention_params(cfg) + ffn


def mtp_params(cfg: ModelConfig, active: bool = False) -> int:
    """All MTP modules, the shared embedding and head excluded. The MTP block is built as layer index
    num_hidden_layers + d, so it is an MoE block whenever the model has MoE layers."""
    H = cfg.hidden_size
    per = 3 * H + 2 * H * H
    return sum(per + layer_params(cfg, cfg.num_hidden_layers + d, active)
               for d in range(cfg.num_nextn_predict_layers))


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model, MTP excluded
    active: int  # per token, main model, embedding included
    embedding: int
    output_head: int  # 0 when tied
    mtp: int  # MTP modules' own parameters
    mtp_active: int

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["active_non_embedding"] = self.active_non_embedding
        d["total_with_mtp"] = self.total_with_mtp
        return d


def param_counts(cfg: ModelConfig) -> ParamCounts:
    H, V = cfg.hidden_size, cfg.vocab_size
    emb = V * H
    head = 0 if cfg.tie_word_embeddings else V * H
    layers = sum(layer_params(cfg, i) for i in range(cfg.num_hidden_layers))
    layers_active = sum(layer_params(cfg, i, active=True) for i in range(cfg.num_hidden_layers))
    return ParamCounts(
        total=emb + head + H + layers,
        active=emb + head + H + layers_active,
        embedding=emb,
        output_head=head,
        mtp=mtp_params(cfg),
        mtp_active=mtp_params(cfg, active=True),
    )


def match_dense_width(moe_cfg: ModelConfig, dense_cfg: ModelConfig) -> int:
    """The dense FFN width that gives ``dense_cfg`` the active parameters per token of ``moe_cfg``."""
    target = param_counts(moe_cfg).active
    without_ffn = param_counts(dense_cfg.replace(intermediate_size=1)).active
    without_ffn -= dense_cfg.num_hidden_layers * 3 * dense_cfg.hidden_size
    per_layer = 3 * dense_cfg.hidden_size * dense_cfg.num_hidden_layers
    return max(1, round((target - without_ffn) / per_layer))


def dense_width_for_params(dense_cfg: ModelConfig, target: int) -> int:
    """The dense FFN width that gives ``dense_cfg`` (``ffn='dense'``) ``target`` parameters, MTP excluded.
    For a dense model total and active counts are equal, so this matches either figure of an MoE model."""
    without_ffn = param_counts(dense_cfg.replace(intermediate_size=1)).total
    without_ffn -= dense_cfg.num_hidden_layers * 3 * dense_cfg.hidden_size
    per_width = 3 * dense_cfg.hidden_size * dense_cfg.num_hidden_layers
    return max(1, round((target - without_ffn) / per_width))


# ----- weight matrices by shape (for the FLOP model and FP8 block scales) -----------------------------
@dataclass(frozen=True)
class Matrix:
    """``count`` weight matrices of shape [rows, cols] (nn.Linear's [out, in]) in the model, of which
    ``active`` are applied to every token. ``part`` groups them for the FLOP and memory breakdowns:
    embedding, head, attention, router, dense_ffn, shared_expert, routed_expert, mtp_proj."""

    name: str
    rows: int
    cols: int
    count: int
    active: int
    part: str
    mtp: bool = False

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.count

    @property
    def active_numel(self) -> int:
        return self.rows * self.cols * self.active


def _block_matrices(cfg: ModelConfig, moe: bool, n: int, mtp: bool) -> list[Matrix]:
    """Matrices of ``n`` decoder blocks. Routed experts are listed per expert as in DeepSeek's checkpoints
    (gate_proj, up_proj, down_proj), which is also the granularity of their FP8 block scales."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    out: list[tuple[str, int, int, int, int, str]] = []
    if cfg.attention == "mla":
        if cfg.q_lora_rank is None:
            out.append(("self_attn.q_proj", nh * cfg.qk_head_dim, H, n, n, "attention"))
        else:
            out.append(("self_attn.q_a_proj", cfg.q_lora_rank, H, n, n, "attention"))
            out.append(("self_attn.q_b_proj", nh * cfg.qk_head_dim, cfg.q_lora_rank, n, n, "attention"))
        out.append(("self_attn.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, H, n, n,
                    "attention"))
        out.append(("self_attn.kv_b_proj", nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank,
                    n, n, "attention"))
    else:
        nkv = cfg.kv_heads
        out.append(("self_attn.q_proj", nh * cfg.qk_head_dim, H, n, n, "attention"))
        out.append(("self_attn.k_proj", nkv * cfg.qk_head_dim, H, n, n, "attention"))
        out.append(("self_attn.v_proj", nkv * cfg.v_head_dim, H, n, n, "attention"))
    out.append(("self_attn.o_proj", H, nh * cfg.v_head_dim, n, n, "attention"))
    if moe:
        E, k, Im = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        out.append(("mlp.gate", E, H, n, n, "router"))
        for proj, rows, cols in (("gate_proj", Im, H), ("up_proj", Im, H), ("down_proj", H, Im)):
            out.append((f"mlp.experts.{proj}", rows, cols, n * E, n * k, "routed_expert"))
        if cfg.n_shared_experts > 0:
            Is = cfg.n_shared_experts * Im
            for proj, rows, cols in (("gate_proj", Is, H), ("up_proj", Is, H), ("down_proj", H, Is)):
                out.append((f"mlp.shared_experts.{proj}", rows, cols, n, n, "shared_expert"))
    else:
        I = cfg.intermediate_size
        for proj, rows, cols in (("gate_proj", I, H), ("up_proj", I, H), ("down_proj", H, I)):
            out.append((f"mlp.{proj}", rows, cols, n, n, "dense_ffn"))
    prefix = "mtp." if mtp else "layers."
    return [Matrix(prefix + name, r, c, cnt, act, part, mtp) for name, r, c, cnt, act, part in out if cnt]


def weight_matrices(cfg: ModelConfig) -> list[Matrix]:
    """Every weight matrix of the model with MTP modules (norm weights, the only 1-D parameters, excluded).
    ``sum(m.numel) + norm weights == param_counts(cfg).total_with_mtp`` (tested against ``numel``).
    A tied output head is not listed: it is the embedding."""
    H, V, L, D = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    n_moe = cfg.n_moe_layers
    mats = [Matrix("embed_tokens", V, H, 1, 0, "embedding")]  # a lookup: no FLOPs, so no active use
    mats += _block_matrices(cfg, moe=False, n=L - n_moe, mtp=False)
    mats += _block_matrices(cfg, moe=True, n=n_moe, mtp=False)
    if D:
        mats.append(Matrix("mtp.eh_proj", H, 2 * H, D, D, "mtp_proj", True))
        mats += _block_matrices(cfg, moe=cfg.is_moe_layer(L), n=D, mtp=True)
    if not cfg.tie_word_embeddings:
        mats.append(Matrix("lm_head", V, H, 1, 1, "head"))
    return mats
