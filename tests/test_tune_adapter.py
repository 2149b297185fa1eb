"""Adapters in PEFT's format: ours loaded by peft onto transformers' DeepseekV3ForCausalLM (loaded from our
export) give our logits, on exactly the modules and parameters we adapted; peft's own files load into ours;
our own round trip; refused configs and tensors are named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from frugallm.config import ModelConfig  # noqa: E402
from frugallm.errors import CheckpointError  # noqa: E402
from frugallm.model import build_model  # noqa: E402
from frugallm.model.hf import save_pretrained  # noqa: E402
from frugallm.tune.adapter import CONFIG, WEIGHTS, load_adapter, save_adapter  # noqa: E402
from frugallm.tune.lora import LoraConfig, apply_lora, lora_modules, trainable_parameters  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, max_position_embeddings=64, initializer_range=0.1)
CASES = {"q-latent": dict(q_lora_rank=24), "no-q-latent": dict(q_lora_rank=None, n_shared_experts=2)}


def _model(case: str = "q-latent", seed: int = 0) -> nn.Module:
    return build_model(ModelConfig(**{**BASE, **CASES[case]}), seed=seed).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))


def _adapted(case: str, cfg: LoraConfig, seed: int = 2) -> nn.Module:
    model = _model(case)
    apply_lora(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)  # B != 0: the adapters change the logits
    return model


def _peft_injected(pm) -> tuple[set[str], set[str]]:
    """(modules peft wrapped as layers, parameters it wrapped), read from the model itself."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    modules, params = set(), set()
    for name, m in pm.base_model.model.named_modules():
        if isinstance(m, ParamWrapper):
            owner = name.replace(".base_layer", "")
            params.add(f"{owner}.{m.parameter_name}")
        elif isinstance(m, LoraLayer):
            modules.add(name)
    return modules, params


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_our_adapter_and_computes_our_logits(case, tmp_path):
    base = _model(case)
    save_pretrained(base, tmp_path / "base")
    cfg = LoraConfig(rank=3, alpha=5.0, dropout=0.1)
    ours = _adapted(case, cfg)
    save_adapter(ours, tmp_path / "adapter", cfg, base_model_name_or_path=str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapter" / CONFIG).read_text())
    assert written["lora_dropout"] == 0.0  # peft refuses dropout with target_parameters (adapter doc)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = _ids()
    with torch.no_grad():
        hf_base = hf(ids).logits
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()

    # what peft put where: exactly our adapted modules, none rewritten into other targets (peft issue 3711)
    adapted = [n for n, _ in lora_modules(ours)]
    experts = {n for n in adapted if n.endswith("mlp.experts")}
    mlp = {n for n in adapted if n.rpartition(".")[2] in ("gate_proj", "up_proj", "down_proj")}
    attn = set(adapted) - experts - mlp
    want_params = {f"{n}.weight" for n in mlp} | {f"{n}.{w}" for n in experts for w in ("gate_up_proj",
                                                                                       "down_proj")}
    modules, params = _peft_injected(pm)
    assert modules == attn and params == want_params
    assert set(pm.base_model.targeted_module_names) == attn
    assert set(pm.base_model.targeted_parameter_names) == want_params
    assert len(experts) == 2 and len(mlp) == 3 + 2 * 3 and (case != "q-latent" or len(attn) == 15)
    assert pm.peft_config["default"].rank_pattern == {}  # no rank doubling from a fused-target rewrite

    with torch.no_grad():
        theirs = pm(input_ids=ids).logits
        mine = ours(ids)
    assert (mine - hf_base).abs().max() > 0.1  # the adapter matters, so agreeing below is a test
    diff = (mine - theirs).abs().max().item()
    assert diff <= 1e-4, f"max |logits difference| {diff:.2e}"


def test_load_adapter_round_trip(tmp_path):
    cfg = LoraConfig(rank=2, alpha=3.0)
    ours = _adapted("q-latent", cfg)
    save_adapter(ours, tmp_path / "a", cfg)
    fresh = _model("q-latent")
    got = load_adapter(fresh, tmp_path / "a")
    assert (got.rank, got.alpha, got.dropout) == (2, 3, 0.0)
    assert [n for n, _ in lora_modules(fresh)] == [n for n, _ in lora_modules(ours)]
    a, b = ours.state_dict(), fresh.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(ids), fresh(ids))
    # attention-only adapters use target_modules, where peft keeps the dropout
    attn_cfg = LoraConfig(rank=2, dropout=0.05, targets=("q_a_proj", "o_proj"))
    save_adapter(_adapted("q-latent", attn_cfg), tmp_path / "attn", attn_cfg)
    written = json.loads((tmp_path / "attn" / CONFIG).read_text())
    assert written["lora_dropout"] == 0.05 and written["target_parameters"] is None
    assert load_adapter(_model("q-latent"), tmp_path / "attn").dropout == 0.05


def test_adapter_written_by_peft_loads_into_ours(tmp_path):
    """peft's own save of an adapter on transformers' model (experts, shared experts, dense MLP, attention)
    read by load_adapter reproduces peft's logits."""
    base = _model("q-latent")
    save_pretrained(base, tmp_path / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    lc = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["model.layers.1.self_attn.kv_b_proj", "o_proj"],
                         target_parameters=["model.layers.2.mlp.experts.gate_up_proj",
                                            "model.layers.2.mlp.experts.down_proj",
                                            "model.layers.0.mlp.up_proj.weight",
                                            "model.layers.1.mlp.shared_experts.down_proj.weight"])
    pm = peft.get_peft_model(hf, lc)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.save_pretrained(tmp_path / "theirs")
    ids = _ids()
    with torch.no_grad():
        theirs = pm.eval()(input_ids=ids).logits
    ours = _model("q-latent")
    cfg = load_adapter(ours, tmp_path / "theirs")
    assert (cfg.rank, cfg.alpha) == (2, 6)
    assert {n for n, _ in lora_modules(ours)} == {
        "model.layers.1.self_attn.kv_b_proj", *(f"model.layers.{i}.self_attn.o_proj" for i in range(3)),
        "model.layers.2.mlp.experts", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.shared_experts.down_proj"}
    with torch.no_grad():
        diff = (ours(ids) - theirs).abs().max().item()
    assert diff <= 1e-4, f"max |logits difference| {diff:.2e}"


def _saved(tmp_path, name: str = "a"):
    cfg = LoraConfig(rank=2)
    save_adapter(_adapted("q-latent", cfg), tmp_path / name, cfg)
    return tmp_path / name


def test_unsupported_config_fields_are_named(tmp_path):
    d = _saved(tmp_path)
    good = json.loads((d / CONFIG).read_text())
    bad = {**good, "use_dora": True, "bias": "all", "rank_pattern": {"o_proj": 4}, "use_rslora": True,
           "modules_to_save": ["lm_head"], "some_future_field": 3, "peft_version": "9.9"}
    (d / CONFIG).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError) as err:
        load_adapter(_model(), d)
    msg = str(err.value)
    for field in ("use_dora=true", 'bias="all"', "rank_pattern=", "use_rslora=true", "modules_to_save=",
                  "some_future_field=3"):
        assert field in msg, (field, msg)
    assert "peft_version" not in msg  # informational fields pass
    (d / CONFIG).write_text(json.dumps({**good, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="IA3"):
        load_adapter(_model(), d)
    (d / CONFIG).write_text(json.dumps({**good, "target_parameters": ["model.layers.1.mlp.experts.down_proj"]}))
    with pytest.raises(CheckpointError, match="gate_up_proj"):
        load_adapter(_model(), d)


def test_unknown_missing_and_misshaped_tensors_are_named(tmp_path):
    d = _saved(tmp_path)
    f = d / WEIGHTS
    state = load_file(f)
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"
    assert tuple(state[key].shape) == (2 * 24, 2 * 8)  # [2I, r*E]
    extra = {**state, "base_model.model.model.layers.0.mlp.gate.lora_A.weight": torch.zeros(2, 48)}
    save_file(extra, f)
    model = _model()
    with pytest.raises(CheckpointError, match=r"unknown tensor.*layers\.0\.mlp\.gate\.lora_A"):
        load_adapter(model, d)
    assert not lora_modules(model)  # nothing applied on a refused adapter
    save_file({**state, key: torch.zeros(48, 17)}, f)
    with pytest.raises(CheckpointError, match=r"experts\.base_layer\.lora_B\.weight has shape \(48, 17\), "
                                              r"expected \(48, 16\)"):
        load_adapter(_model(), d)
    del state[key]
    save_file(state, f)
    with pytest.raises(CheckpointError, match="missing tensor.*experts.base_layer.lora_B"):
        load_adapter(_model(), d)
    (d / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=CONFIG):
        load_adapter(_model(), d)


def test_mtp_adapters_are_refused_at_save(tmp_path):
    model = build_model(ModelConfig(**{**BASE, **CASES["q-latent"], "num_nextn_predict_layers": 1}))
    cfg = LoraConfig(rank=2, mtp=True)
    apply_lora(model, cfg)
    with pytest.raises(CheckpointError, match="model.mtp.0"):
        save_adapter(model, tmp_path / "m", cfg)
    assert not (tmp_path / "m" / CONFIG).exists()
