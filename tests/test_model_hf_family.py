"""Parity across the DeepSeek-architecture family, both directions, float32: random small configurations
shaped like DeepSeek-V3 (both RoPE layouts, YaRN, linear and llama3 scaling), Moonlight, Kimi-K2, V2-Lite
(softmax, greedy) and V2 (softmax, group-limited greedy), written by transformers' DeepseekV3ForCausalLM /
DeepseekV2ForCausalLM and loaded by us, and written by us and loaded by transformers. Then every field we
refuse: the error names it."""

from __future__ import annotations

import json

import pytest
import torch

from frugallm import from_pretrained
from frugallm.config import HF_NEUTRAL_FIELDS, ModelConfig, preset
from frugallm.errors import CheckpointError, ConfigError
from frugallm.model import build_model
from frugallm.model.hf import save_pretrained

transformers = pytest.importorskip("transformers")  # a peer, a test dependency only

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, max_position_embeddings=256,
            initializer_range=0.1, num_nextn_predict_layers=0)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

CASES = {
    # DeepSeek-V3 / R1 shapes
    "v3-halves-rope": dict(rope_interleave=False, q_lora_rank=None, n_group=1, topk_group=1,
                           first_k_dense_replace=1, norm_topk_prob=True),
    "v3-halves-yarn-groups": dict(rope_interleave=False, q_lora_rank=24, n_group=4, topk_group=2,
                                  first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=2.5,
                                  rope_scaling=YARN),
    "v3-yarn-untruncated": dict(q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=2,
                                rope_scaling={**YARN, "truncate": False, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "v3-linear-rope": dict(q_lora_rank=16, first_k_dense_replace=1, rope_scaling={"type": "linear", "factor": 2.0}),
    "v3-llama3-rope": dict(q_lora_rank=None, first_k_dense_replace=1, rope_theta=500.0,
                           rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Moonlight-16B-A3B: no query compression, one group, two shared experts, eps 1e-5, theta 50000
    "moonlight": dict(q_lora_rank=None, n_group=1, topk_group=1, n_shared_experts=2, first_k_dense_replace=1,
                      rms_norm_eps=1e-5, rope_theta=50000.0, routed_scaling_factor=2.446, num_experts_per_tok=3),
    # eps 1e-5 with query compression too: the latent norms keep 1e-6 in transformers and DeepSeek's code
    "v3-eps-1e-5": dict(q_lora_rank=24, n_group=2, topk_group=2, rms_norm_eps=1e-5, first_k_dense_replace=1),
    # Kimi-K2: more experts, one group, YaRN with beta_fast = beta_slow = 1
    "kimi-k2": dict(q_lora_rank=24, n_routed_experts=24, num_experts_per_tok=4, n_group=1, topk_group=1,
                    first_k_dense_replace=1, routed_scaling_factor=2.827, rope_theta=50000.0,
                    rope_scaling={**YARN, "beta_fast": 1.0, "beta_slow": 1.0}),
    # DeepSeek-V2-Lite: softmax scores, greedy top-k over all experts, gates not renormalised
    "v2-lite-greedy": dict(scoring_func="softmax", topk_method="greedy", q_lora_rank=None, n_group=1,
                           topk_group=1, n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=False,
                           rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # DeepSeek-V2: softmax, group-limited greedy (a group scored by its best expert), a large routed scale
    "v2-group-limited": dict(scoring_func="softmax", topk_method="group_limited_greedy", q_lora_rank=24,
                             n_group=4, topk_group=2, first_k_dense_replace=0, norm_topk_prob=False,
                             routed_scaling_factor=16.0),
    # V2's greedy ignores the groups a config may still list
    "v2-greedy-ignores-groups": dict(scoring_func="softmax", topk_method="greedy", q_lora_rank=16, n_group=4,
                                     topk_group=1, num_experts_per_tok=3, first_k_dense_replace=2,
                                     norm_topk_prob=False),
}


def _cfg(case: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **CASES[case]})


def _hf_config(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    cls = transformers.DeepseekV3Config if cfg.hf_model_type == "deepseek_v3" else transformers.DeepseekV2Config
    return cls(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")})


def _theirs(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    hf_cfg = _hf_config(cfg)
    cls = transformers.DeepseekV3ForCausalLM if cfg.hf_model_type == "deepseek_v3" else \
        transformers.DeepseekV2ForCausalLM
    model = cls(hf_cfg).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))


def _max_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    ids = _ids()
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


def test_the_cases_really_differ() -> None:
    """The layouts and routings these tests tell apart give different logits on the same weights: the
    parity below would catch a loader that ignored them."""
    cfg = _cfg("v3-halves-rope")
    a = build_model(cfg, seed=5).eval()
    b = build_model(cfg.replace(rope_interleave=True), seed=5).eval()
    greedy = _cfg("v2-greedy-ignores-groups").replace(topk_group=2)
    g = build_model(greedy, seed=5).eval()
    h = build_model(greedy.replace(topk_method="group_limited_greedy"), seed=5).eval()
    with torch.no_grad():
        assert (a(_ids()) - b(_ids())).abs().max() > 1e-2
        assert (g(_ids()) - h(_ids())).abs().max() > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_theirs_to_ours(case: str, tmp_path) -> None:
    cfg = _cfg(case)
    theirs = _theirs(cfg)
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf").eval()
    assert ours.config.topk_method == cfg.topk_method and ours.config.rope_interleave == cfg.rope_interleave
    diff = _max_diff(ours, theirs)
    assert diff <= 1e-4, f"max |logits difference| {diff:.2e}"
    # saved again by us, it is what transformers wrote: their class loads it to the same logits
    save_pretrained(ours, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["model_type"] == cfg.hf_model_type
    if cfg.hf_model_type == "deepseek_v3":
        assert written["rope_interleave"] is cfg.rope_interleave
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    diff = _max_diff(ours, back)
    assert diff <= 1e-4, f"max |logits difference| after our save {diff:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_theirs(case: str, tmp_path) -> None:
    cfg = _cfg(case)
    ours = build_model(cfg, seed=3).eval()
    if cfg.topk_method == "noaux_tc":
        with torch.no_grad():
            for moe in ours.moe_layers():
                moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts) * 0.05)
    save_pretrained(ours, tmp_path / "ours")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    want = "DeepseekV3ForCausalLM" if cfg.hf_model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    assert type(theirs).__name__ == want
    diff = _max_diff(ours, theirs)
    assert diff <= 1e-4, f"max |logits difference| {diff:.2e}"


def _published_style(tmp_path, case: str, **fields) -> tuple[torch.nn.Module, object]:  # type: ignore[no-untyped-def]
    """transformers' checkpoint with its config.json rewritten the way the published repositories write
    theirs: legacy rope_scaling + rope_theta, remote-code and training fields."""
    cfg = _cfg(case)
    theirs = _theirs(cfg)
    theirs.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    d = json.loads(path.read_text())
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    d["rope_scaling"] = None if rp.get("rope_type") == "default" else {"type": rp.pop("rope_type"), **rp}
    d.update(auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}, moe_layer_freq=1,
             seq_aux=True, aux_loss_alpha=0.001, ep_size=1, torch_dtype="bfloat16",
             scoring_func="sigmoid" if cfg.hf_model_type == "deepseek_v3" else "softmax",
             topk_method=cfg.topk_method, architectures=[type(theirs).__name__], **fields)
    path.write_text(json.dumps(d))
    return theirs, path


@pytest.mark.parametrize("case", ["kimi-k2", "moonlight", "v2-group-limited"])
def test_published_config_layout(case: str, tmp_path) -> None:
    fields = {"model_type": "kimi_k2"} if case == "kimi-k2" else {}
    theirs, _ = _published_style(tmp_path, case, **fields)
    ours = from_pretrained(tmp_path / "hf").eval()
    assert _max_diff(ours, theirs) <= 1e-4


def test_published_presets_round_trip() -> None:
    for name in ("deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "moonlight-16b-a3b", "kimi-k2"):
        cfg = preset(name)
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg, name


# ----- refusals: each names its field ------------------------------------------------------------------------
V3 = _cfg("v3-yarn-untruncated").to_hf_dict()
V2 = _cfg("v2-group-limited").to_hf_dict()

REFUSED = [
    (V3, {"hidden_act": "gelu"}, "hidden_act"),
    (V3, {"attention_bias": True}, "attention_bias"),
    (V2, {"mlp_bias": True}, "mlp_bias"),
    (V3, {"attention_dropout": 0.1}, "attention_dropout"),
    (V3, {"num_key_value_heads": 2}, "num_key_value_heads"),
    (V3, {"head_dim": 64}, "head_dim"),
    (V3, {"qk_head_dim": 7}, "qk_head_dim"),
    (V3, {"moe_layer_freq": 2}, "moe_layer_freq"),
    (V3, {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    (V3, {"num_experts_per_tok": None}, "num_experts_per_tok"),
    (V3, {"first_k_dense_replace": None}, "first_k_dense_replace"),
    (V3, {"pruned_heads": {"0": [1]}}, "pruned_heads"),
    (V3, {"is_encoder_decoder": True}, "is_encoder_decoder"),
    (V3, {"num_local_experts": 9}, "num_local_experts"),
    (V3, {"sliding_window": 128}, "sliding_window"),
    (V3, {"index_topk": 2048}, "index_topk"),
    (V3, {"model_type": "deepseek_v32"}, "model_type"),
    (V3, {"model_type": "llama"}, "model_type"),
    (V3, {"architectures": ["DeepseekV2ForCausalLM"]}, "architectures"),
    (V3, {"scoring_func": "softmax"}, "scoring_func"),
    (V3, {"topk_method": "greedy"}, "topk_method"),
    (V3, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
    (V3, {"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type"),
    (V3, {"rope_scaling": {**YARN, "short_factor": [1.0]}}, "short_factor"),
    (V3, {"rope_scaling": {"type": "llama3", "factor": 8.0}}, "original_max_position_embeddings"),
    (V3, {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters"),
    (V3, {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}},
     "quantization_config"),
    (V3, {"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
    (V2, {"norm_topk_prob": True}, "norm_topk_prob"),
    (V2, {"scoring_func": "sigmoid"}, "scoring_func"),
    (V2, {"topk_method": "noaux_tc"}, "topk_method"),
    (V2, {"num_nextn_predict_layers": 1}, "num_nextn_predict_layers"),
    (V2, {"rope_interleave": False}, "rope_interleave"),
]


@pytest.mark.parametrize("base,change,field", REFUSED, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(REFUSED)])
def test_refused_field_is_named(base: dict, change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_hf_dict({**base, **change})


def test_refusal_reaches_the_loader_as_one_checkpoint_error(tmp_path) -> None:
    save_pretrained(build_model(_cfg("moonlight"), seed=1), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rope_scaling": {"type": "dynamic", "factor": 2}}))
    with pytest.raises(CheckpointError, match=r"config\.json.*rope_scaling\.type.*'dynamic'"):
        from_pretrained(tmp_path / "m")


def test_neutral_fields_are_ignored_and_nothing_else() -> None:
    """Every field listed as computation-neutral loads with any value; the listed names do not overlap the
    fields that do change the computation."""
    noisy = {name: "anything" for name in HF_NEUTRAL_FIELDS}
    assert ModelConfig.from_hf_dict({**V3, **noisy}) == ModelConfig.from_hf_dict(V3)
    computing = set(ModelConfig.from_hf_dict(V3).to_dict())
    assert not computing & set(HF_NEUTRAL_FIELDS)


def test_absent_fields_take_transformers_defaults() -> None:
    """A config.json that leaves fields out means transformers' class defaults, not ours."""
    v2 = ModelConfig.from_hf_dict({"model_type": "deepseek_v2", "num_experts_per_tok": 6, "num_hidden_layers": 2})
    assert (v2.first_k_dense_replace, v2.scoring_func, v2.topk_method, v2.norm_topk_prob, v2.vocab_size,
            v2.moe_intermediate_size, v2.num_nextn_predict_layers) == (0, "softmax", "greedy", False, 102400, 1407, 0)
    v3 = ModelConfig.from_hf_dict({"model_type": "deepseek_v3", "num_hidden_layers": 4})
    assert (v3.first_k_dense_replace, v3.n_group, v3.topk_group, v3.routed_scaling_factor, v3.vocab_size) == \
        (3, 8, 4, 2.5, 129280)


def test_v2_export_refuses_a_trained_bias(tmp_path) -> None:
    model = build_model(_cfg("v2-lite-greedy"), seed=1)
    with torch.no_grad():
        model.moe_layers()[0].gate.e_score_correction_bias[0] = 0.01
    with pytest.raises(CheckpointError, match="e_score_correction_bias"):
        save_pretrained(model, tmp_path / "v2")
    assert not (tmp_path / "v2").exists()


@pytest.mark.parametrize("name,total,active", [
    ("deepseek-v2", 236e9, 21e9),  # DeepSeek-V2 report (arXiv 2405.04434), abstract: 236B total, 21B active
    ("deepseek-v2-lite", 15.7e9, 2.4e9),  # same report, appendix: 15.7B total, 2.4B active
    ("moonlight-16b-a3b", 16e9, 3e9),  # arXiv 2502.16982: "16B ... 3B activated" (rounded figures)
])
def test_published_preset_sizes(name: str, total: float, active: float) -> None:
    """The presets are the published shapes: their parameter counts match the papers' figures (to 10%, as the
    papers round; the active figure with or without the embedding, which the papers count differently)."""
    from frugallm.cost.params import param_counts

    counts = param_counts(preset(name))
    assert abs(counts.total / total - 1) < 0.1, counts
    assert min(abs(counts.active / active - 1), abs(counts.active_non_embedding / active - 1)) < 0.1, counts
