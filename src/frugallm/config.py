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


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


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
            rs = dict(self.rope_scaling)
            kind = rs.get("type", rs.get("rope_type"))
            _require(kind in ("yarn", "default", None),
                     f"rope_scaling.type must be 'yarn' (or absent), got {kind!r}")
            if kind == "yarn":
                _require(float(rs.get("factor", 0)) >= 1.0,
                         f"rope_scaling.factor must be >= 1 for yarn, got {rs.get('factor')!r}")
                _require(int(rs.get("original_max_position_embeddings", 0)) > 0,
                         "rope_scaling.original_max_position_embeddings must be a positive integer for yarn")
        _require(self.num_nextn_predict_layers >= 0,
                 f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        _require(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
                 f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                 f"got {self.first_k_dense_replace}")
        if self.ffn == "moe":
            self._validate_moe()

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
        reachable = self.topk_group * (E // G)
        _require(1 <= self.num_experts_per_tok <= reachable,
                 f"num_experts_per_tok must be in [1, {reachable}] (the experts inside topk_group="
                 f"{self.topk_group} groups of {E // G}), got {self.num_experts_per_tok}")
        if G > 1:
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        _require(not unknown, f"unknown model config field(s): {', '.join(unknown)}; "
                 f"allowed: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except TypeError as e:  # wrong types surface as TypeError from arithmetic in validation
            raise ConfigError(f"invalid model config: {e}") from None

    # ----- Hugging Face config.json ------------------------------------------------------------
    def hf_export_problem(self) -> str | None:
        """Why this configuration has no Hugging Face DeepSeek equivalent, or None when it has one: the one
        rule for ``to_hf_dict``, the training loop's export and anything else that asks."""
        if self.attention == "mla" and self.ffn == "moe" and self.scoring_func == "sigmoid":
            return None
        return ("only the DeepSeek-V3 architecture (attention='mla', ffn='moe', scoring_func='sigmoid') "
                "has a Hugging Face equivalent; baselines cannot be exported")

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers loads as ``DeepseekV3Config``."""
        problem = self.hf_export_problem()
        _require(problem is None, problem or "")
        d = {k: v for k, v in self.to_dict().items() if k not in ("attention", "ffn", "scoring_func")}
        d["num_key_value_heads"] = self.num_attention_heads
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_act="silu",
                 attention_bias=False, attention_dropout=0.0, topk_method="noaux_tc", use_cache=True,
                 bos_token_id=0, eos_token_id=1, pad_token_id=None, torch_dtype="float32",
                 rope_interleave=True)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face DeepSeek-V3 (or V2) ``config.json`` onto ``ModelConfig``."""
        mt = d.get("model_type", "deepseek_v3")
        _require(mt in ("deepseek_v3", "deepseek_v2"),
                 f"config.json model_type must be 'deepseek_v3' or 'deepseek_v2', got {mt!r}")
        known = {f.name for f in fields(cls)} - {"attention", "ffn", "scoring_func", "num_key_value_heads"}
        kw = {k: d[k] for k in known if k in d and d[k] is not None or k == "q_lora_rank" and k in d}
        scoring = d.get("scoring_func", "sigmoid" if mt == "deepseek_v3" else "softmax")
        kw["scoring_func"] = scoring
        rs = kw.get("rope_scaling")
        if rs is not None:
            rs = dict(rs)
            if "rope_type" in rs and "type" not in rs:
                rs["type"] = rs["rope_type"]
            if rs.get("type") not in ("yarn",):
                rs = None
            kw["rope_scaling"] = rs
        if d.get("rope_parameters") and "rope_scaling" not in d:
            rp = dict(d["rope_parameters"])
            kw.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", rp.get("type")) == "yarn":
                rp.pop("rope_theta", None)
                rp["type"] = "yarn"
                kw["rope_scaling"] = rp
        return cls.from_dict(kw)


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
        routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax", first_k_dense_replace=1,
        num_nextn_predict_layers=0, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
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
    """A dense MHA baseline whose active parameters per token match ``tiny``'s."""
    from frugallm.cost.params import match_dense_width

    base = _tiny()
    dense = base.replace(attention="mha", ffn="dense", q_lora_rank=None, num_nextn_predict_layers=0)
    return dense.replace(intermediate_size=match_dense_width(base, dense))


PRESETS = {
    "deepseek-v3": _deepseek_v3,
    "deepseek-v2-lite": _deepseek_v2_lite,
    "tiny": _tiny,
    "tiny-dense": _tiny_dense,
}

PRESET_SOURCES = {
    "deepseek-v3": "deepseek-ai/DeepSeek-V3 config.json (arXiv 2412.19437)",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite config.json (arXiv 2405.04434)",
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
