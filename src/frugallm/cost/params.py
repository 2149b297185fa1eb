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
