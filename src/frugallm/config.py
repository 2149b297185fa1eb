"""Configuration: the model's shape, presets, and loading from TOML or a Hugging Face ``config.json``.

``ModelConfig`` uses the field names of Hugging Face's ``DeepseekV3Config`` so that a published
``config.json`` maps onto it field for field. Three fields are ours and select the baselines we measure
against: ``attention`` (``mla`` | ``mha`` | ``gqa``), ``ffn`` (``moe`` | ``dense``) and ``scoring_func``
(``sigmoid`` as in V3, ``softmax`` as in V2).

Every field is validated in ``__post_init__`` and an error names the field and the values allowed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from frugallm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ATTENTION_KINDS = ("mla", "mha", "gqa")
FFN_KINDS = ("moe", "dense")
SCORING_FUNCS = ("sigmoid", "softmax")
# how the router picks experts: V3's bias-corrected group top-2 (``noaux_tc``), V2-Lite's plain top-k
# (``greedy``), V2's top-k inside the groups with the highest single score (``group_limited_greedy``)
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
# RoPE scalings with fixed frequencies that we compute as transformers does; ``dynamic`` and ``longrope``
# change the frequencies with the sequence length, which a KV cache cannot follow, and are refused
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def reject_unknown_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """A ``ConfigError`` naming the keys of ``d`` that are not fields of the dataclass ``cls``, and the
    allowed ones: the one check every config table's ``from_dict`` makes."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    _require(not unknown, f"unknown {what} field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")


@dataclass(kw_only=True)
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 4
    intermediate_size: int = 1024  # dense FFN width (dense layers and the dense baseline)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    # attention (MLA; the mha/gqa baselines use num_key_value_heads and qk/v head dims)
    attention: str = "mla"
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # gqa only; mha uses num_attention_heads
    q_lora_rank: int | None = 128  # None: a full query projection
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor": ..., ...}
    # True: RoPE rotates interleaved pairs (x0, x1), (x2, x3) ... as DeepSeek's checkpoints lay out q_rope and
    # k_rope; False: it rotates the two halves (x_i, x_{i + d_r/2}) (transformers' ``rope_interleave=false``)
    rope_interleave: bool = True
    # mixture of experts
    ffn: str = "moe"
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 256
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str | None = None  # None: noaux_tc for sigmoid; for softmax greedy, group-limited with groups
    first_k_dense_replace: int = 1
    # multi-token prediction
    num_nextn_predict_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            _require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                     f"{name} must be a positive integer, got {v!r}")
        _require(self.attention in ATTENTION_KINDS,
                 f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {self.attention!r}")
        _require(self.ffn in FFN_KINDS, f"ffn must be one of {', '.join(FFN_KINDS)}, got {self.ffn!r}")
        _require(self.scoring_func in SCORING_FUNCS,
                 f"scoring_func must be one of {', '.join(SCORING_FUNCS)}, got {self.scoring_func!r}")
        if self.topk_method is None:  # what a config written before the field existed computed
            self.topk_method = ("noaux_tc" if self.scoring_func == "sigmoid" else
                                "group_limited_greedy" if self.n_group > 1 else "greedy")
        _require(self.topk_method in TOPK_METHODS,
                 f"topk_method must be one of {', '.join(TOPK_METHODS)}, got {self.topk_method!r}")
        _require(isinstance(self.rope_interleave, bool),
                 f"rope_interleave must be true or false, got {self.rope_interleave!r}")
        _require(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
                 f"q_lora_rank must be a positive integer or None, got {self.q_lora_rank!r}")
        _require(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        _require(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _require(self.initializer_range > 0, f"initializer_range must be > 0, got {self.initializer_range}")
        _require(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        if self.attention == "gqa":
            kv = self.num_key_value_heads
            _require(isinstance(kv, int) and kv > 0 and self.num_attention_heads % kv == 0,
                     f"num_key_value_heads must divide num_attention_heads={self.num_attention_heads} "
                     f"for attention='gqa', got {kv!r}")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        _require(self.num_nextn_predict_layers >= 0,
                 f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        _require(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                 f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                 f"got {self.first_k_dense_replace}")
        if self.ffn == "moe":
            self._validate_moe()

    def _validate_rope_scaling(self) -> None:
        rs = dict(self.rope_scaling or {})
        kind = rs.get("type", rs.get("rope_type"))
        _require(kind in ROPE_TYPES,
                 f"rope_scaling.type must be one of {', '.join(ROPE_TYPES)}, got {kind!r}"
                 + (" (its frequencies change with the sequence length, which a KV cache cannot follow)"
                    if kind in ("dynamic", "longrope") else ""))
        if "type" in rs and "rope_type" in rs:
            _require(rs["type"] == rs["rope_type"],
                     f"rope_scaling.type {rs['type']!r} and rope_scaling.rope_type {rs['rope_type']!r} differ")
        extra = sorted(set(rs) - {"type", "rope_type"} - _ROPE_KEYS[kind])
        _require(not extra, f"rope_scaling field(s) {', '.join(extra)} are not supported for type {kind!r}; "
                 f"allowed: {', '.join(sorted(_ROPE_KEYS[kind])) or 'none'}")
        if kind == "default":
            return
        factor = rs.get("factor")
        _require(isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor >= 1.0,
                 f"rope_scaling.factor must be a number >= 1 for {kind}, got {factor!r}")
        if kind in ("yarn", "llama3"):
            orig = rs.get("original_max_position_embeddings")
            _require(isinstance(orig, int) and not isinstance(orig, bool) and orig > 0,
                     f"rope_scaling.original_max_position_embeddings must be a positive integer for {kind}, "
                     f"got {orig!r}")
        if kind == "llama3":
            lo, hi = rs.get("low_freq_factor"), rs.get("high_freq_factor")
            _require(isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo < hi,
                     f"rope_scaling.low_freq_factor and high_freq_factor must be numbers with 0 < low < high "
                     f"for llama3, got {lo!r} and {hi!r}")

    def _validate_moe(self) -> None:
        E, G = self.n_routed_experts, self.n_group
        _require(E > 0, f"n_routed_experts must be > 0, got {E}")
        _require(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        _require(self.moe_intermediate_size > 0,
                 f"moe_intermediate_size must be > 0, got {self.moe_intermediate_size}")
        _require(G > 0 and E % G == 0,
                 f"n_routed_experts={E} must be divisible by n_group; allowed n_group values: "
                 f"{[d for d in range(1, E + 1) if E % d == 0]}, got {G}")
        _require(1 <= self.topk_group <= G, f"topk_group must be in [1, n_group={G}], got {self.topk_group}")
        if self.topk_method == "greedy":  # greedy picks among all experts whatever the groups
            _require(1 <= self.num_experts_per_tok <= E,
                     f"num_experts_per_tok must be in [1, n_routed_experts={E}], got {self.num_experts_per_tok}")
        else:
            reachable = self.topk_group * (E // G)
            _require(1 <= self.num_experts_per_tok <= reachable,
                     f"num_experts_per_tok must be in [1, {reachable}] (the experts inside topk_group="
                     f"{self.topk_group} groups of {E // G}), got {self.num_experts_per_tok}")
        if G > 1 and self.topk_method == "noaux_tc":
            _require(E // G >= 2, f"each group needs at least 2 experts (a group scores by its top two), "
                     f"got n_routed_experts={E}, n_group={G}")
        _require(self.routed_scaling_factor > 0,
                 f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")

    # ----- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the mha/gqa baselines."""
        if self.attention == "gqa":
            assert self.num_key_value_heads is not None
            return self.num_key_value_heads
        return self.num_attention_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.ffn == "moe" and layer >= self.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        reject_unknown_fields(cls, d, "model config")
        try:
            return cls(**d)
        except TypeError as e:  # wrong types surface as TypeError from arithmetic in validation
            raise ConfigError(f"invalid model config: {e}") from None

    # ----- Hugging Face config.json ------------------------------------------------------------
    @property
    def hf_model_type(self) -> str:
        """The transformers model that computes what this configuration computes: ``deepseek_v3`` (sigmoid
        scores, bias-corrected group routing) or ``deepseek_v2`` (softmax scores, greedy or group-limited)."""
        return "deepseek_v3" if self.topk_method == "noaux_tc" else "deepseek_v2"

    def hf_export_problem(self) -> str | None:
        """Why this configuration has no Hugging Face DeepSeek equivalent, or None when it has one: the one
        rule for ``to_hf_dict``, the training loop's export and anything else that asks."""
        if self.attention != "mla" or self.ffn != "moe":
            return (f"only MLA attention with a mixture of experts has a Hugging Face DeepSeek equivalent; "
                    f"attention={self.attention!r}, ffn={self.ffn!r} is one of our baselines")
        if self.topk_method == "noaux_tc":
            if self.scoring_func != "sigmoid":
                return ("transformers' DeepseekV3 always scores experts with a sigmoid; "
                        f"scoring_func={self.scoring_func!r} with topk_method='noaux_tc' has no equivalent")
            return None
        # transformers' DeepseekV2: softmax scores, the gates never renormalised, no MTP, interleaved RoPE
        if self.scoring_func != "softmax":
            return (f"transformers' DeepseekV2 always scores experts with a softmax; scoring_func="
                    f"{self.scoring_func!r} with topk_method={self.topk_method!r} has no equivalent")
        if self.norm_topk_prob:
            return "transformers' DeepseekV2 never renormalises the gates; norm_topk_prob=True has no equivalent"
        if self.num_nextn_predict_layers:
            return "transformers' DeepseekV2 has no multi-token prediction; num_nextn_predict_layers must be 0"
        if not self.rope_interleave:
            return "transformers' DeepseekV2 rotates interleaved pairs only; rope_interleave=False has no equivalent"
        return None

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` in the published layout that transformers loads as ``DeepseekV3Config`` or
        ``DeepseekV2Config`` (``hf_model_type``), computing what this configuration computes."""
        problem = self.hf_export_problem()
        _require(problem is None, problem or "")
        d = {k: v for k, v in self.to_dict().items() if k not in ("attention", "ffn")}
        d["num_key_value_heads"] = self.num_attention_heads
        d.update(hidden_act="silu", attention_bias=False, attention_dropout=0.0, use_cache=True,
                 bos_token_id=0, eos_token_id=1, pad_token_id=None, torch_dtype="float32")
        if self.hf_model_type == "deepseek_v3":
            d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
        else:
            for name in ("rope_interleave", "num_nextn_predict_layers"):  # V2 has neither (both checked above)
                d.pop(name)
            d.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], mlp_bias=False)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face DeepSeek-V3 / V2 ``config.json`` (the published ones, transformers' own, Kimi-K2's
        and Moonlight's) onto ``ModelConfig``. Every field is honoured, checked to hold the one value we
        compute, or listed in ``HF_NEUTRAL_FIELDS`` as not changing the computation; any other field or value
        is refused with a ``ConfigError`` naming it, so that a checkpoint never loads into a model that
        computes something else."""
        return _from_hf_dict(cls, d)


# ----- Hugging Face config.json fields ----------------------------------------------------------------
# Fields of transformers' DeepseekV3Config / DeepseekV2Config and of the published config.json files
# (DeepSeek-V3 / V3.1 / R1, V2, V2-Lite, Moonlight, Kimi-K2) that do not change what the model computes, with
# the reason each may be ignored. Everything else is honoured, checked (``_HF_CHECKED``) or refused.
HF_NEUTRAL_FIELDS: dict[str, str] = {
    "transformers_version": "the version of transformers that wrote the file",
    "_name_or_path": "where transformers loaded the file from",
    "torch_dtype": "the storage dtype; frugallm loads into the dtype it is asked for",
    "dtype": "the storage dtype; frugallm loads into the dtype it is asked for",
    "auto_map": "names remote code, which frugallm never runs",
    "bos_token_id": "a token id: the tokenizer's business",
    "eos_token_id": "a token id: the tokenizer's business",
    "pad_token_id": "a token id: the tokenizer's business",
    "sep_token_id": "a token id: the tokenizer's business",
    "decoder_start_token_id": "a token id: the tokenizer's business",
    "use_cache": "whether transformers returns a cache, not what the model computes",
    "output_attentions": "what a transformers forward call returns",
    "output_hidden_states": "what a transformers forward call returns",
    "output_router_logits": "what a transformers forward call returns",
    "return_dict": "what a transformers forward call returns",
    "torchscript": "a transformers export switch",
    "chunk_size_feed_forward": "transformers' memory chunking, same values",
    "id2label": "labels of classification heads this model does not have",
    "label2id": "labels of classification heads this model does not have",
    "problem_type": "for classification heads this model does not have",
    "finetuning_task": "a note about classification heads",
    "task_specific_params": "generation defaults",
    "prefix": "a prompt prefix for generation",
    "tokenizer_class": "which tokenizer class transformers builds",
    "pretraining_tp": "the tensor-parallel degree of pre-training; transformers' DeepSeek models ignore it",
    "ep_size": "the expert-parallel degree of DeepSeek's run",
    "seq_aux": "the balance loss of DeepSeek's training code; frugallm's training config sets its own",
    "aux_loss_alpha": "the balance loss of DeepSeek's training code; frugallm's training config sets its own",
    **{name: "a generation default, not the model's computation" for name in (
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
        "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
        "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
        "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
        "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss", "use_bfloat16")},
}

# config.json fields that must hold the one value frugallm computes: field -> (check, what is allowed)
_HF_CHECKED: dict[str, tuple[Any, str]] = {
    "hidden_act": (lambda v, d: v == "silu", "'silu' (SwiGLU experts)"),
    "attention_bias": (lambda v, d: v in (False, None), "false (MLA's projections have no bias)"),
    "mlp_bias": (lambda v, d: v in (False, None), "false (the experts have no bias)"),
    "attention_dropout": (lambda v, d: v in (0, 0.0, None), "0 (frugallm has no attention dropout)"),
    "num_key_value_heads": (lambda v, d: v is None or v == d.get("num_attention_heads"),
                            "num_attention_heads (MLA expands K and V per head)"),
    "head_dim": (lambda v, d: v is None or v == d.get("qk_rope_head_dim"),
                 "qk_rope_head_dim (transformers derives it so)"),
    "qk_head_dim": (lambda v, d: v is None or v == d.get("qk_nope_head_dim", 0) + d.get("qk_rope_head_dim", 0),
                    "qk_nope_head_dim + qk_rope_head_dim"),
    "moe_layer_freq": (lambda v, d: v in (1, None),
                       "1 (every layer from first_k_dense_replace on is MoE; transformers ignores other values)"),
    "partial_rotary_factor": (lambda v, d: v in (1, 1.0, None), "1 (RoPE covers all qk_rope_head_dim dims)"),
    "num_experts": (lambda v, d: v is None or v == d.get("n_routed_experts"), "n_routed_experts"),
    "num_local_experts": (lambda v, d: v is None or v == d.get("n_routed_experts"), "n_routed_experts"),
    "num_mtp_layers": (lambda v, d: v is None or v == d.get("num_nextn_predict_layers", v),
                       "num_nextn_predict_layers"),
    "is_encoder_decoder": (lambda v, d: not v, "false (a decoder-only model)"),
    "is_decoder": (lambda v, d: v in (False, True, None), "a boolean"),
    "add_cross_attention": (lambda v, d: not v, "false (a decoder-only model)"),
    "tie_encoder_decoder": (lambda v, d: not v, "false (a decoder-only model)"),
    "cross_attention_hidden_size": (lambda v, d: v is None, "null (a decoder-only model)"),
    "pruned_heads": (lambda v, d: not v, "empty (no attention heads pruned)"),
    "quantization_config": (lambda v, d: _fp8_block_spec(v), "FP8 e4m3 with 128x128 weight blocks "
                            "({'quant_method': 'fp8', 'fmt': 'e4m3', 'weight_block_size': [128, 128]}), "
                            "dequantized on load"),
}

# transformers' defaults for fields a config.json may leave out, per family (DeepseekV3Config / V2Config)
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                        initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        rope_theta=10000.0, rope_interleave=True, num_nextn_predict_layers=1,
                        scoring_func="sigmoid", topk_method="noaux_tc"),
    "deepseek_v2": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, max_position_embeddings=2048, initializer_range=0.02,
                        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, first_k_dense_replace=0,
                        kv_lora_rank=512, q_lora_rank=1536, n_group=None, n_routed_experts=64, n_shared_experts=2,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None,
                        topk_method="greedy", norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None,
                        moe_intermediate_size=1407, scoring_func="softmax", rope_interleave=True,
                        num_nextn_predict_layers=0),
}
_HF_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
# the model types whose architecture is DeepSeek-V3's under another name (Kimi-K2 ships "kimi_k2")
_HF_V3_ALIASES = ("kimi_k2",)
# values transformers' class ignores or fixes for a family, where another value would mean a different model
_HF_FAMILY_FIXED: dict[str, dict[str, tuple[Any, ...]]] = {
    "deepseek_v3": {"scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",)},
    "deepseek_v2": {"scoring_func": ("softmax",), "topk_method": ("greedy", "group_limited_greedy"),
                    "norm_topk_prob": (False,), "rope_interleave": (True,), "num_nextn_predict_layers": (0,)},
}
_HF_WHY_FIXED = {
    "scoring_func": "transformers' {cls} scores experts one way only",
    "topk_method": "transformers' {cls} routes one way only",
    "norm_topk_prob": "transformers' DeepseekV2 never renormalises the gates, while DeepSeek's reference code "
                      "would; no published V2 checkpoint sets it",
    "rope_interleave": "DeepSeek-V2 rotates interleaved pairs only",
    "num_nextn_predict_layers": "DeepSeek-V2 has no multi-token prediction",
}
_MODEL_FIELDS_FROM_HF = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "rms_norm_eps",
                         "max_position_embeddings", "tie_word_embeddings", "initializer_range",
                         "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                         "qk_rope_head_dim", "v_head_dim", "rope_interleave", "n_routed_experts",
                         "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
                         "topk_group", "routed_scaling_factor", "norm_topk_prob", "scoring_func", "topk_method",
                         "first_k_dense_replace", "num_nextn_predict_layers")
_NULLABLE = {"q_lora_rank", "n_group", "topk_group"}  # None: a full query projection; no groups


def _fp8_block_spec(q: Any) -> bool:
    if q is None:
        return True
    return (isinstance(q, dict) and q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3"
            and list(q.get("weight_block_size", [128, 128])) == [128, 128]
            and set(q) <= {"quant_method", "fmt", "weight_block_size", "activation_scheme"})


def _hf_rope(d: dict[str, Any], family_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers 5's ``rope_parameters`` or the legacy ``rope_theta`` +
    ``rope_scaling``."""
    params, legacy = d.get("rope_parameters"), d.get("rope_scaling")
    if params is not None and legacy is not None:
        p = {k: v for k, v in params.items() if k != "rope_theta"}
        lg = dict(legacy)
        if p.get("rope_type", p.get("type")) != lg.get("rope_type", lg.get("type")) or \
                {k: v for k, v in p.items() if k not in ("type", "rope_type")} != \
                {k: v for k, v in lg.items() if k not in ("type", "rope_type")}:
            raise ConfigError(f"config.json: rope_parameters {params!r} and rope_scaling {legacy!r} disagree")
    if params is not None:
        _require(isinstance(params, dict), f"config.json: rope_parameters must be an object, got {params!r}")
        rs = dict(params)
        theta = rs.pop("rope_theta", d.get("rope_theta", family_theta))
    else:
        _require(legacy is None or isinstance(legacy, dict),
                 f"config.json: rope_scaling must be an object or null, got {legacy!r}")
        rs = dict(legacy or {})
        theta = d.get("rope_theta", family_theta)
    if not rs:
        return theta, None
    kind = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    rs.pop("type", None)
    if kind == "default" and not rs:
        return theta, None
    if kind == "yarn" and rs.get("factor") is None and rs.get("original_max_position_embeddings"):
        # transformers derives a missing yarn factor from the two context lengths
        rs["factor"] = d.get("max_position_embeddings", 0) / rs["original_max_position_embeddings"]
    return theta, {"type": kind, **rs}


def _from_hf_dict(cls: type[ModelConfig], d: dict[str, Any]) -> ModelConfig:
    _require(isinstance(d, dict), f"config.json must hold an object, got {type(d).__name__}")
    mt, arch = d.get("model_type"), d.get("architectures")
    family = "deepseek_v3" if mt in _HF_V3_ALIASES else mt
    if family is None and isinstance(arch, list) and len(arch) == 1:
        family = {v: k for k, v in _HF_ARCHITECTURES.items()}.get(arch[0])
    _require(family in _HF_ARCHITECTURES,
             f"config.json model_type must be one of deepseek_v3, deepseek_v2, {', '.join(_HF_V3_ALIASES)}, "
             f"got {mt!r}" + (" (DeepSeek-V3.2's sparse attention is not implemented)" if mt == "deepseek_v32"
                              else ""))
    _require(arch is None or arch == [_HF_ARCHITECTURES[family]],
             f"config.json architectures must be [{_HF_ARCHITECTURES[family]!r}] for model_type {mt!r}, "
             f"got {arch!r}")
    rope_fields = {"rope_theta", "rope_scaling", "rope_parameters"}
    known = set(_MODEL_FIELDS_FROM_HF) | set(_HF_CHECKED) | set(HF_NEUTRAL_FIELDS) | rope_fields | \
        {"model_type", "architectures"}
    unknown = sorted(set(d) - known)
    _require(not unknown, "config.json field(s) frugallm does not know: "
             + ", ".join(f"{k}={d[k]!r}" for k in unknown)
             + "; refusing to load a model that might compute something else (the fields that do not change "
               "the computation are listed in frugallm.config.HF_NEUTRAL_FIELDS)")
    for name, (ok, allowed) in _HF_CHECKED.items():
        if name in d and not ok(d[name], d):
            raise ConfigError(f"config.json field {name}={d[name]!r} is not supported: frugallm computes "
                              f"{name} = {allowed}")
    defaults = _HF_DEFAULTS[family]
    kw: dict[str, Any] = {}
    for name in _MODEL_FIELDS_FROM_HF:
        v = d.get(name, defaults.get(name))
        if name == "num_nextn_predict_layers" and "num_nextn_predict_layers" not in d:
            v = d.get("num_mtp_layers", v)
        if v is None and name in ("n_group", "topk_group"):
            v = 1  # transformers' V2 leaves both null for greedy routing
        _require(v is not None or name in _NULLABLE, f"config.json field {name} must be set, got null")
        kw[name] = v
    for name, allowed in _HF_FAMILY_FIXED[family].items():
        if kw[name] not in allowed:
            why = _HF_WHY_FIXED[name].format(cls=_HF_ARCHITECTURES[family].removesuffix("ForCausalLM"))
            raise ConfigError(f"config.json field {name}={kw[name]!r} is not supported for model_type {mt!r}: "
                              f"{why}; allowed: {', '.join(repr(a) for a in allowed)}")
    kw["rope_theta"], kw["rope_scaling"] = _hf_rope(d, defaults["rope_theta"])
    try:
        return cls.from_dict(kw)
    except ConfigError as e:
        raise ConfigError(f"config.json: {e}") from None


# ----- presets -------------------------------------------------------------------------------------
def _deepseek_v3() -> ModelConfig:
    """The published 671B configuration (deepseek-ai/DeepSeek-V3 config.json)."""
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, intermediate_size=18432,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, moe_intermediate_size=2048, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3,
        num_nextn_predict_layers=1, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        rms_norm_eps=1e-6, initializer_range=0.006,
    )


def _deepseek_v2_lite() -> ModelConfig:
    """The published 15.7B DeepSeek-V2-Lite configuration (softmax gating, no query compression)."""
    return ModelConfig(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, intermediate_size=10944,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, moe_intermediate_size=1408, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy",
        first_k_dense_replace=1,
        num_nextn_predict_layers=0, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        rms_norm_eps=1e-6, initializer_range=0.02,
    )


def _deepseek_v2() -> ModelConfig:
    """The published 236B DeepSeek-V2 configuration (softmax gating, group-limited greedy routing)."""
    return ModelConfig(
        vocab_size=102400, hidden_size=5120, num_hidden_layers=60, intermediate_size=12288,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160, n_shared_experts=2,
        num_experts_per_tok=6, moe_intermediate_size=1536, n_group=8, topk_group=3,
        routed_scaling_factor=16.0, norm_topk_prob=False, scoring_func="softmax",
        topk_method="group_limited_greedy", first_k_dense_replace=1, num_nextn_predict_layers=0,
        max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        rms_norm_eps=1e-6, initializer_range=0.02,
    )


def _moonlight() -> ModelConfig:
    """Moonshot AI's Moonlight-16B-A3B: DeepSeek-V3's architecture (model_type deepseek_v3) with 64 routed
    experts in one group, no query compression and no MTP."""
    return ModelConfig(
        vocab_size=163840, hidden_size=2048, num_hidden_layers=27, intermediate_size=11264,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, moe_intermediate_size=1408, n_group=1, topk_group=1,
        routed_scaling_factor=2.446, norm_topk_prob=True, first_k_dense_replace=1,
        num_nextn_predict_layers=0, max_position_embeddings=8192, rope_theta=50000.0, rope_scaling=None,
        rms_norm_eps=1e-5, initializer_range=0.02,
    )


def _kimi_k2() -> ModelConfig:
    """Moonshot AI's Kimi-K2 (1T total, 32B active): DeepSeek-V3's architecture with 384 routed experts in
    one group, 64 heads and no MTP."""
    return ModelConfig(
        vocab_size=163840, hidden_size=7168, num_hidden_layers=61, intermediate_size=18432,
        num_attention_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384, n_shared_experts=1,
        num_experts_per_tok=8, moe_intermediate_size=2048, n_group=1, topk_group=1,
        routed_scaling_factor=2.827, norm_topk_prob=True, first_k_dense_replace=1,
        num_nextn_predict_layers=0, max_position_embeddings=131072, rope_theta=50000.0,
        rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        rms_norm_eps=1e-6, initializer_range=0.02,
    )


def _tiny() -> ModelConfig:
    """The CPU default: DeepSeek-V3-shaped (MLA, shared + fine-grained routed experts, MTP),
    sized to train usefully in ten minutes on two cores."""
    return ModelConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, intermediate_size=768,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=192, n_group=4, topk_group=2,
        routed_scaling_factor=1.0, norm_topk_prob=True, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=1024, initializer_range=0.02,
    )


def _tiny_dense() -> ModelConfig:
    """A dense MHA baseline whose active parameters per token match ``tiny``'s: the FFN width is what
    ``frugallm.cost.params.match_dense_width(tiny, this)`` computes, which tests/test_model.py checks (config
    does not import cost, which builds on config)."""
    return _tiny().replace(attention="mha", ffn="dense", q_lora_rank=None, num_nextn_predict_layers=0,
                           intermediate_size=580)


PRESETS = {
    "deepseek-v3": _deepseek_v3,
    "deepseek-v2": _deepseek_v2,
    "deepseek-v2-lite": _deepseek_v2_lite,
    "moonlight-16b-a3b": _moonlight,
    "kimi-k2": _kimi_k2,
    "tiny": _tiny,
    "tiny-dense": _tiny_dense,
}

PRESET_SOURCES = {
    "deepseek-v3": "deepseek-ai/DeepSeek-V3 config.json (arXiv 2412.19437)",
    "deepseek-v2": "deepseek-ai/DeepSeek-V2 config.json (arXiv 2405.04434)",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite config.json (arXiv 2405.04434)",
    "moonlight-16b-a3b": "moonshotai/Moonlight-16B-A3B config.json (arXiv 2502.16982)",
    "kimi-k2": "moonshotai/Kimi-K2-Instruct config.json (model_type kimi_k2, DeepseekV3 architecture)",
    "tiny": "frugallm: the CPU default, DeepSeek-V3-shaped",
    "tiny-dense": "frugallm: dense MHA baseline with tiny's active parameters",
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----- loading -----------------------------------------------------------------------------------
def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def load_model_config(path: str | Path) -> ModelConfig:
    """A frugallm TOML (a ``[model]`` table, optionally ``preset = NAME`` plus overrides), a Hugging Face
    ``config.json``, or a directory holding one of them."""
    p = Path(path)
    if p.is_dir():
        for name in ("config.json", "config.toml"):
            if (p / name).is_file():
                return load_model_config(p / name)
        raise ConfigError(f"{p}: no config.json or config.toml in this directory")
    if not p.is_file():
        raise ConfigError(f"config not found: {p}")
    if p.suffix == ".json":
        try:
            return ModelConfig.from_hf_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from None
    data = read_toml(p)
    return model_config_from_table(data.get("model", data), where=str(p))


def model_config_from_table(table: dict[str, Any], where: str = "config") -> ModelConfig:
    """A ``[model]`` table: optionally ``preset = NAME``, then field overrides. TOML has no null, so fields
    set to None are listed in ``unset = [...]`` (as a run's config.toml writes them)."""
    table = dict(table)
    for key in table.pop("unset", []):
        table[key] = None
    name = table.pop("preset", None)
    base = preset(name).to_dict() if name else {}
    base.update(table)
    try:
        return ModelConfig.from_dict(base)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def config_summary_fields() -> list[str]:
    return [f.name for f in fields(ModelConfig)]


__all__ = ["ModelConfig", "PRESETS", "PRESET_SOURCES", "preset", "load_model_config",
           "model_config_from_table", "read_toml", "field"]
