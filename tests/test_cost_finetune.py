"""``frugallm.cost.finetune`` and ``frugallm cost finetune``: the module walk against a built model, LoRA
counts by hand, the target rules, the memory of LoRA over fp8 / bf16 and of full fine-tuning, the GPUs each
needs, the FLOPs, the CLI and its errors, and the torch-free targets module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from frugallm.cli import main
from frugallm.config import preset
from frugallm.cost.finetune import (
    finetune_flops_per_token,
    finetune_memory,
    gpus_needed,
    lora_parameter_count,
    lora_target_modules,
    model_modules,
)
from frugallm.cost.flops import forward_flops_per_token, train_flops_per_token
from frugallm.cost.memory import training_memory, weight_bytes
from frugallm.cost.params import param_counts
from frugallm.errors import ConfigError
from frugallm.tune.targets import DEFAULT_TARGETS, pattern_matches

SRC = Path(__file__).resolve().parents[1] / "src"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----- the module walk --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,changes", [("tiny", {}), ("tiny", {"q_lora_rank": None}),
                                          ("tiny", {"tie_word_embeddings": True}), ("tiny-dense", {})])
def test_module_walk_is_the_built_models_tree(name: str, changes: dict) -> None:
    from frugallm.model.transformer import build_model

    cfg = preset(name).replace(**changes)
    model = build_model(cfg, device="meta")
    built = {n: {p: tuple(t.shape) for p, t in m.named_parameters(recurse=False)}
             for n, m in model.named_modules() if n and list(m.parameters(recurse=False))}
    walk = model_modules(cfg)  # a tied head is listed (its module holds the embedding's weight), numel 0
    assert [m.name for m in walk] == list(built)
    for m in walk:
        shapes = built[m.name]
        if m.kind == "experts":
            E, Im, H = m.shape
            assert shapes == {"gate_up_proj": (E, 2 * Im, H), "down_proj": (E, H, Im)}
        else:
            assert shapes == {"weight": m.shape}
    assert sum(m.numel for m in walk) == sum(p.numel() for p in model.parameters())
    assert sum(m.numel for m in walk) == param_counts(cfg).total_with_mtp


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3", "deepseek-v2-lite"])
def test_walk_weight_bytes_are_the_memory_models(name: str) -> None:
    cfg = preset(name)
    for prec in ("bf16", "fp8"):
        assert sum(m.weight_bytes(prec) for m in model_modules(cfg)) == weight_bytes(cfg, prec)


# ----- LoRA parameters ----------------------------------------------------------------------------------------
def test_lora_count_for_tiny_by_hand() -> None:
    cfg = preset("tiny")
    r = 8
    H, nh, L, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.first_k_dense_replace
    rq, rkv, dqk = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn = r * ((H + rq) + (rq + nh * dqk) + (H + rkv + cfg.qk_rope_head_dim)
                + (rkv + nh * (cfg.qk_nope_head_dim + cfg.v_head_dim)) + (nh * cfg.v_head_dim + H))
    I, Im, E = cfg.intermediate_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    dense = r * 3 * (H + I)  # gate, up, down: each r * (H + I)
    shared = r * 3 * (H + cfg.n_shared_experts * Im)
    routed = E * (r * (H + 2 * Im) + r * (Im + H))
    want = L * attn + D * dense + (L - D) * (shared + routed)  # MTP left out by default
    assert lora_parameter_count(cfg, r) == want
    mtp_block = attn + shared + routed  # tiny's MTP block is an MoE block; eh_proj is no default pattern
    assert lora_parameter_count(cfg, r, mtp=True) == want + mtp_block
    assert lora_parameter_count(cfg, r, ["o_proj"]) == L * r * (nh * cfg.v_head_dim + H)
    assert lora_parameter_count(cfg, 2 * r) == 2 * want  # linear in the rank


def test_target_rules() -> None:
    cfg = preset("tiny")
    names = [m.name for m in lora_target_modules(cfg, ["mlp.experts"])]
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(1, cfg.num_hidden_layers)]
    assert not pattern_matches("experts", "model.layers.1.mlp.shared_experts")
    assert pattern_matches("gate", "model.layers.1.mlp.gate") and not pattern_matches("gate", "x.mlp.gate_proj")
    assert [m.name for m in lora_target_modules(cfg, [r"re:model\.layers\.0\.(self_attn|mlp)\..*"])] == [
        f"model.layers.0.{n}" for n in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                                       "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                       "mlp.down_proj")]
    # the default set skips what a layout lacks (q_proj here, mlp.experts in a dense model)
    assert lora_parameter_count(preset("tiny-dense"), 4) > 0
    with pytest.raises(ConfigError, match="matches no module.*self_attn.q_a_proj"):
        lora_parameter_count(cfg, 4, ["q_proj"])
    with pytest.raises(ConfigError, match="mlp.gate \\(router\\), not a linear"):
        lora_parameter_count(cfg, 4, ["gate"])
    with pytest.raises(ConfigError, match="lm_head"):
        lora_parameter_count(cfg, 4, ["lm_head"])
    with pytest.raises(ConfigError, match="only MTP modules"):
        lora_parameter_count(cfg, 4, ["eh_proj"])
    assert lora_parameter_count(cfg, 4, ["eh_proj"], mtp=True) == 4 * 3 * cfg.hidden_size
    with pytest.raises(ConfigError, match="regular expression"):
        lora_parameter_count(cfg, 4, ["re:("])
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="rank"):
            lora_parameter_count(cfg, bad)  # type: ignore[arg-type]


# ----- memory ---------------------------------------------------------------------------------------------------
def test_lora_memory_states_are_the_adapters_only() -> None:
    cfg = preset("tiny")
    p = lora_parameter_count(cfg, 8)
    m = finetune_memory(cfg, method="lora", base_precision="bf16", lora_rank=8, seq_len=128)
    assert (m.trainable_master, m.grads, m.optimizer) == (4 * p, 4 * p, 8 * p)
    assert m.weights_bf16 == weight_bytes(cfg, "bf16") and m.weights_e4m3 == 0
    bf16_moments = finetune_memory(cfg, method="lora", lora_rank=8, seq_len=128, adam_moments="bf16")
    assert bf16_moments.optimizer == 4 * p
    assert m.step_buffers == 2 * p  # bf16 casts of fp32 adapters, one GPU holds them all


def test_full_memory_is_training_memorys() -> None:
    cfg = preset("tiny")
    m = finetune_memory(cfg, method="full", seq_len=128, micro_batch=2, adam_moments="bf16")
    tm = training_memory(cfg, 256, seq_len=128, precision="bf16", moments="bf16")
    assert (m.weights_bf16, m.trainable_master, m.grads, m.optimizer, m.activations, m.step_buffers) == (
        tm.weights, tm.master_weights, tm.grads, tm.optimizer, tm.activations, tm.step_buffers)
    assert m.total == tm.total  # one GPU: nothing gathered
    with pytest.raises(ConfigError, match="fp8 base"):
        finetune_memory(cfg, method="full", base_precision="fp8")


def test_deepseek_v3_figures_are_sane_and_ordered() -> None:
    cfg = preset("deepseek-v3")
    fp8 = finetune_memory(cfg, method="lora", base_precision="fp8")
    bf16 = finetune_memory(cfg, method="lora", base_precision="bf16")
    full = finetune_memory(cfg, method="full")
    # fp8: about half of bf16; the scales about 4 / 128^2 bytes per e4m3 element (partial tiles a little more)
    assert 0.49 < fp8.weights / bf16.weights < 0.51
    assert 4 / 128**2 <= fp8.weights_scales / fp8.weights_e4m3 < 1.05 * 4 / 128**2
    assert fp8.weights_bf16 < 0.01 * fp8.weights  # embedding, head, router, norms, eh_proj
    assert fp8.trainable_params == bf16.trainable_params < 0.01 * full.trainable_params
    assert full.trainable_params == param_counts(cfg).total_with_mtp
    # same activations for both methods: every linear input is kept by an adapter or the weight gradient
    assert abs(bf16.activations / full.activations - 1) < 0.01
    h800 = 80e9
    need = [gpus_needed(cfg, h800, method=m, base_precision=b, activation_checkpointing=True)
            for m, b in (("lora", "fp8"), ("lora", "bf16"), ("full", "bf16"))]
    assert all(n.gpus is not None for n in need)
    assert need[0].min_gpus < need[1].min_gpus < need[2].min_gpus
    for n in need:  # the least count: one fewer does not fit
        assert n.memory.total <= h800
        assert finetune_memory(cfg, method=n.memory.method, base_precision=n.memory.base_precision,
                               activation_checkpointing=True, gpus=n.min_gpus - 1).total > h800
        assert cfg.n_routed_experts % n.gpus == 0 or n.gpus % cfg.n_routed_experts == 0
    # without recomputation one 4096-token sequence's activations exceed an H800 whatever the count
    assert gpus_needed(cfg, h800, method="lora", base_precision="fp8").gpus is None


def test_flops() -> None:
    cfg = preset("tiny")
    r, S = 8, 256
    full = finetune_flops_per_token(cfg, S, method="full")
    assert full == train_flops_per_token(cfg, S)
    H, I_m, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    adapters = 0
    for m in lora_target_modules(cfg):
        if m.kind == "experts":
            adapters += k * 2 * r * ((H + 2 * I_m) + (I_m + H))
        else:
            adapters += 2 * r * sum(m.shape)
    lora = finetune_flops_per_token(cfg, S, method="lora", lora_rank=r)
    assert lora == 2 * forward_flops_per_token(cfg, S, include_mtp=True) + 3 * adapters
    assert 0.6 < lora / full < 0.75  # about 4N against 6N
    v3 = preset("deepseek-v3")
    assert 0.66 < finetune_flops_per_token(v3, 4096, method="lora") / train_flops_per_token(v3, 4096) < 0.7


# ----- the CLI ----------------------------------------------------------------------------------------------------
V3 = ["cost", "finetune", "--preset", "deepseek-v3", "--gpu", "h800"]


def test_cli_compare_table(capsys) -> None:
    rc, out, err = run([*V3, "--tokens", "1e8"], capsys)
    assert rc == 0, err
    for row in ("LoRA r=16, fp8 base", "LoRA r=16, bf16 base", "full, bf16 + fp32 master", "base_weights_e4m3",
                "base_weights_scales", "base_weights_bf16", "trainable_master", "gradients", "optimizer_states",
                "activations", "total_per_gpu", "gpus_needed", "gpu_hours", "cost_usd"):
        assert row in out, row
    rec = json.loads(run([*V3, "--tokens", "1e8", "--json"], capsys)[1])
    fp8, bf16, full = rec["runs"]
    assert (fp8["base_precision"], bf16["base_precision"], full["method"]) == ("fp8", "bf16", "full")
    assert fp8["gpus_needed"] <= bf16["gpus_needed"] < full["gpus_needed"]
    assert fp8["cost_usd"] == pytest.approx(fp8["gpu_hours"] * 2.0)  # the catalogue's H800 price
    assert full["gpu_hours"] == pytest.approx(1e8 * full["flops_per_token"] / (rec["mfu"] * 989e12) / 3600)
    for run_ in rec["runs"]:
        assert f"{run_['gpus_needed']:,}" in out


def test_cli_one_method(capsys) -> None:
    rc, out, err = run([*V3, "--method", "lora", "--lora-rank", "8", "--lora-targets", "o_proj", "kv_b_proj",
                        "--gpus", "64", "--mfu", "0.3", "--price-per-hour", "3", "--tokens", "1e6"], capsys)
    assert rc == 0, err
    assert "LoRA r=8, fp8 base" in out and "at --gpus 64" in out and "full, bf16" not in out
    want = lora_parameter_count(preset("deepseek-v3"), 8, ["o_proj", "kv_b_proj"])
    assert f"{want:,}" in out
    rc, out, _ = run([*V3, "--method", "full", "--compare"], capsys)
    assert rc == 0 and "full, bf16 + fp32 master" in out and "LoRA r=16, fp8 base" in out


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope", "--gpu", "h800"], "unknown preset"),
    (["--preset", "tiny", "--gpu", "nope"], "unknown GPU"),
    (["--preset", "tiny", "--gpu", "h800", "--lora-rank", "0"], "rank"),
    (["--preset", "tiny", "--gpu", "h800", "--method", "full", "--base-precision", "fp8"], "fp8"),
    (["--preset", "tiny", "--gpu", "h800", "--lora-targets", "nothing_here"], "matches no module"),
    (["--preset", "tiny"], "--gpu is required"),
    (["--preset", "tiny", "--gpu", "h800", "--tokens", "-1"], "--tokens"),
])
def test_cli_bad_input_is_one_line_and_code_2(args: list[str], message: str, capsys) -> None:
    rc, out, err = run(["cost", "finetune", *args], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


# ----- the targets module stays torch-free ---------------------------------------------------------------------
def test_targets_module_imports_without_torch() -> None:
    from tests.test_imports import external_imports_of, import_graph

    graph = import_graph(SRC, "frugallm")
    assert graph["frugallm.tune.targets"] <= {"frugallm", "frugallm.tune"}
    assert not [m for m in external_imports_of(SRC / "frugallm/tune/targets.py") if m.split(".")[0] == "torch"]
    code = ("import sys; import frugallm.tune.targets as t; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(len(t.DEFAULT_TARGETS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(DEFAULT_TARGETS)
