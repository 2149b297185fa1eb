"""The FLOP model against PyTorch's own counter, and the parameter helpers against real models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from frugallm.config import ModelConfig, preset
from frugallm.cost.flops import (
    decode_flops_per_token,
    forward_flops_breakdown,
    forward_flops_per_token,
    prefill_flops_per_token,
    six_n_estimate,
    train_flops_per_token,
)
from frugallm.cost.params import param_counts, weight_matrices
from frugallm.errors import ConfigError
from frugallm.kernels import choose
from frugallm.model import build_model
from shapes import COST_SMALL

SMALL = COST_SMALL

CASES = {
    "mla-moe-mtp": dict(num_nextn_predict_layers=1),
    "mla-dense-mtp2-no-qlora": dict(ffn="dense", num_nextn_predict_layers=2, q_lora_rank=None),
    "mha-moe": dict(attention="mha"),
    "gqa-dense-mtp-tied": dict(attention="gqa", num_key_value_heads=1, ffn="dense", num_nextn_predict_layers=1,
                               tie_word_embeddings=True),
    # d_qk == d_v: PyTorch runs its fused CPU flash kernel, which FlopCounterMode does not count by itself
    "mha-dense-equal-head-dims": dict(attention="mha", ffn="dense", qk_nope_head_dim=4, qk_rope_head_dim=4,
                                      v_head_dim=8),
}


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _addmm_inplace(self, mat1, mat2, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat1[0] * mat1[1] * mat2[1]  # the counter hands over shapes


def _onednn_linear(x, w, *args, out_shape=None, **kwargs) -> int:
    return 2 * x[0] * x[1] * w[0]  # x [M, K], w [N, K]


# The CPU flash kernel computes the full S x S (masked blocks included), like the math kernel. The fused
# output head accumulates its weight gradient with the in-place addmm_, and on AVX-512 CPUs the training
# GEMMs run on oneDNN's inner product (frugallm.kernels.gemm): the counter knows neither.
COUNT_CPU_FLASH = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    torch.ops.aten.addmm_: _addmm_inplace,
    torch.ops.mkldnn._linear_pointwise: _onednn_linear,
}
B, S = 2, 12


def _counted(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=COUNT_CPU_FLASH) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("case", CASES)
def test_flops_match_flop_counter(case: str) -> None:
    """Forward (``model(ids)``) and forward + backward (``forward_train``) within 2% of PyTorch's counter.
    The MoE routes data-dependently, but every token reaches exactly k experts, so the count is exact.
    The zero columns that pad v for the CPU flash kernel are not model FLOPs: counted with SDPA as it is."""
    cfg = ModelConfig(**{**SMALL, **CASES[case]})
    model = build_model(cfg, kernels=replace(choose("cpu", "fp32"), attention="sdpa"))
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1 + cfg.num_nextn_predict_layers))
    with torch.no_grad():
        measured = _counted(lambda: model(tokens[:, :S]))
    predicted = forward_flops_per_token(cfg, S, causal=False) * B * S
    assert measured > 0
    assert abs(predicted - measured) / measured < 0.02, ("forward", predicted, measured)

    def step() -> None:
        out = model.forward_train(tokens)
        (out.loss + sum(out.mtp_losses) + 1e-4 * out.balance_loss).backward()

    measured = _counted(step)
    predicted = train_flops_per_token(cfg, S, causal=False) * B * S
    assert abs(predicted - measured) / measured < 0.02, ("train", predicted, measured)
    if cfg.num_nextn_predict_layers:  # the MTP modules are really counted: without them the model is off
        without = train_flops_per_token(cfg, S, causal=False, include_mtp=False) * B * S
        assert abs(without - measured) / measured > 0.05


def test_causal_counts_the_lower_triangle() -> None:
    cfg = ModelConfig(**SMALL)
    full = forward_flops_breakdown(cfg, S, causal=False)
    causal = forward_flops_breakdown(cfg, S, causal=True)
    for key in ("attention_scores", "attention_values"):
        # S(S+1)/2 query-key pairs instead of S*S
        assert causal[key] * S == pytest.approx(full[key] * (S + 1) / 2)
    assert {k: v for k, v in full.items() if not k.startswith("attention_")} == \
           {k: v for k, v in causal.items() if not k.startswith("attention_")}


def test_deepseek_v3_flops() -> None:
    cfg = preset("deepseek-v3")
    bd = forward_flops_breakdown(cfg, 4096)
    # routed experts: 58 MoE layers x 8 experts x 3 matrices of 7168 x 2048, 2 FLOPs per MAC
    assert bd["routed_experts"] == 58 * 8 * 3 * 7168 * 2048 * 2
    # attention at 4096, causal: 61 layers x 2 x 128 heads x (192 + 128) x 4097/2
    assert bd["attention_scores"] + bd["attention_values"] == pytest.approx(61 * 2 * 128 * 320 * 4097 / 2)
    train = train_flops_per_token(cfg, 4096)
    six_n = six_n_estimate(cfg)
    assert six_n == 6 * (param_counts(cfg).active - param_counts(cfg).embedding)
    # exact count exceeds 6N by attention over 4096 tokens and the MTP module, by a bounded margin
    assert 1.1 < train / six_n < 1.3


def test_inference_flops() -> None:
    cfg = preset("deepseek-v3")
    # absorbed decode attends over the 576-wide latent: scores 2*n_h*(r_kv+d_r)*T, values 2*n_h*r_kv*T
    d1, d2 = decode_flops_per_token(cfg, 1000), decode_flops_per_token(cfg, 2000)
    assert d2 - d1 == 61 * 1000 * 2 * 128 * (576 + 512)
    # re-expanding K and V from the latent at every step costs kv_b_proj over the context
    assert decode_flops_per_token(cfg, 4096, absorbed=False) > 20 * decode_flops_per_token(cfg, 4096)
    # prefill: the head runs once per prompt, so longer prompts share it
    head = 2 * cfg.hidden_size * cfg.vocab_size
    p = prefill_flops_per_token(cfg, 4096)
    assert p == pytest.approx(forward_flops_per_token(cfg, 4096) - head + head / 4096)
    gqa = ModelConfig(**{**SMALL, "attention": "gqa", "num_key_value_heads": 1})
    # one more key: 2 layers x 2 FLOPs x 2 heads x (d_qk 12 + d_v 8)
    assert decode_flops_per_token(gqa, 11) - decode_flops_per_token(gqa, 10) == 2 * 2 * 2 * (12 + 8)
    with pytest.raises(ConfigError, match="context_len"):
        decode_flops_per_token(cfg, 0)
    with pytest.raises(ConfigError, match="seq_len"):
        forward_flops_per_token(cfg, -1)


@pytest.mark.parametrize("case", CASES)
def test_parameter_counts_equal_numel(case: str) -> None:
    cfg = ModelConfig(**{**SMALL, **CASES[case]})
    model = build_model(cfg, device="meta")
    params = dict(model.named_parameters())
    assert param_counts(cfg).total_with_mtp == sum(p.numel() for p in params.values())
    # weight_matrices lists every matrix; the rest are the norm weights
    assert sum(m.numel for m in weight_matrices(cfg)) == sum(p.numel() for p in params.values() if p.dim() >= 2)
    assert all(name.endswith("norm.weight") for name, p in params.items() if p.dim() == 1)
