"""Numerical parity with transformers' DeepseekV3ForCausalLM, both directions, float32."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from frugallm import from_pretrained  # noqa: E402
from frugallm.config import ModelConfig  # noqa: E402
from frugallm.errors import CheckpointError  # noqa: E402
from frugallm.model import build_model  # noqa: E402
from frugallm.model.hf import save_pretrained  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=12, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.1)

CASES = {
    "groups-qlora-yarn": dict(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1,
                              norm_topk_prob=True, routed_scaling_factor=2.5,
                              rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                            "mscale_all_dim": 1.0}),
    "no-qlora-unnormed": dict(q_lora_rank=None, n_group=2, topk_group=1, first_k_dense_replace=2,
                              norm_topk_prob=False, routed_scaling_factor=1.0),
    "single-group-mtp": dict(q_lora_rank=16, n_group=1, topk_group=1, first_k_dense_replace=0,
                             norm_topk_prob=True, num_nextn_predict_layers=1, n_shared_experts=2),
}


def _ours(case: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **CASES[case]})


def _randomise_bias(model: torch.nn.Module, gen: torch.Generator) -> None:
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.05)


def _ids() -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_theirs_to_ours(case: str, tmp_path) -> None:
    cfg = _ours(case)
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                              if k not in ("architectures", "model_type")})
    theirs = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        _randomise_bias(theirs, gen)
    theirs.save_pretrained(tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf").eval()
    ids = _ids()
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"max |logits difference| {diff:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_theirs(case: str, tmp_path) -> None:
    cfg = _ours(case)
    ours = build_model(cfg, seed=3).eval()
    with torch.no_grad():
        _randomise_bias(ours, torch.Generator().manual_seed(4))
    save_pretrained(ours, tmp_path / "ours")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    ids = _ids()
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"max |logits difference| {diff:.2e}"
    # and back again: MTP modules survive our own round trip
    again = from_pretrained(tmp_path / "ours")
    assert again.config.num_nextn_predict_layers == cfg.num_nextn_predict_layers
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_sharded_save_and_load(tmp_path) -> None:
    cfg = _ours("single-group-mtp")
    ours = build_model(cfg, seed=5)
    save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=50_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = from_pretrained(tmp_path / "sharded")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))


def test_missing_and_misshaped_tensors_are_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    cfg = _ours("no-qlora-unnormed")
    save_pretrained(build_model(cfg), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    state = load_file(f)
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(state, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        from_pretrained(tmp_path / "m")
    state["model.layers.2.mlp.experts.5.up_proj.weight"] = torch.zeros(24, 48)
    state["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    save_file(state, f)
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight.*\(3, 3\).*expected \(80, 16\)"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(tmp_path / "m")


def test_fp8_block_dequantization_on_load(tmp_path) -> None:
    """A checkpoint in the published FP8 layout (e4m3 weights + 128x128 weight_scale_inv) loads dequantized."""
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig(**{**BASE, "hidden_size": 160, "moe_intermediate_size": 136, **CASES["no-qlora-unnormed"]})
    ref = build_model(cfg, seed=6)
    save_pretrained(ref, tmp_path / "fp8")
    f = tmp_path / "fp8" / "model.safetensors"
    state = load_file(f)
    expected = {}
    for name in [n for n in state if n.endswith("proj.weight") and state[n].dim() == 2]:
        w = state[name]
        rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
        # per-block scale = amax / 448, as the published checkpoint does
        blocks = torch.nn.functional.pad(w, (0, cols * 128 - w.shape[1], 0, rows * 128 - w.shape[0]))
        amax = blocks.abs().unflatten(0, (rows, 128)).unflatten(2, (cols, 128)).amax(dim=(1, 3))
        scale = (amax / 448).clamp(min=1e-12)
        full = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        q = (w / full).to(torch.float8_e4m3fn)
        state[name] = q
        state[name + "_scale_inv"] = scale
        expected[name] = q.float() * full
    save_file(state, f)
    cfgj = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfgj["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfgj))
    loaded = from_pretrained(tmp_path / "fp8")
    sd = loaded.state_dict()
    w_name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(sd[w_name], expected[w_name])
    # an expert slice of the stacked tensor got its own dequantized block values
    assert torch.equal(sd["model.layers.2.mlp.experts.down_proj"][3],
                       expected["model.layers.2.mlp.experts.3.down_proj.weight"])
    rel = (sd[w_name] - ref.state_dict()[w_name]).norm() / ref.state_dict()[w_name].norm()
    assert 0 < rel < 0.05  # e4m3 rounding, not garbage
