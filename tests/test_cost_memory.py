"""The memory model: KV cache bytes against tensors the model produces, weights by dtype against the real
parameters, activations against the tensors autograd saves, and the training total."""

from __future__ import annotations

import math

import pytest
import torch

from frugallm.config import ModelConfig, preset
from frugallm.cost.memory import (
    activation_bytes_per_token,
    fp8_scale_bytes,
    kv_cache_bytes_per_token,
    require_fits,
    step_buffer_bytes,
    training_memory,
    weight_bytes,
)
from frugallm.cost.params import param_counts
from frugallm.errors import ConfigError, ResourceError
from frugallm.model import build_model
from shapes import COST_SMALL

SMALL = COST_SMALL


def test_deepseek_v3_mla_cache_is_70272_bytes() -> None:
    cfg = preset("deepseek-v3")
    assert kv_cache_bytes_per_token(cfg, "bf16") == (512 + 64) * 61 * 2 == 70_272
    assert kv_cache_bytes_per_token(cfg, "fp8") == 35_136
    # the MHA equivalent with V3's head dims, as our GQA class would cache it: 128 heads x (192 + 128)
    assert kv_cache_bytes_per_token(cfg, "bf16", attention="mha") == 128 * 320 * 61 * 2
    assert kv_cache_bytes_per_token(cfg, "bf16", attention="gqa", kv_heads=8) == 8 * 320 * 61 * 2
    with pytest.raises(ConfigError, match="kv_heads"):
        kv_cache_bytes_per_token(cfg, attention="gqa", kv_heads=3)


@torch.no_grad()
def test_kv_cache_bytes_equal_the_models_cached_tensors() -> None:
    """Until the serving cache exists: build the cache from the model's own per-layer outputs (MLA: the
    normalised latent and the rotated rope key; GQA: k and v) and count its bytes."""
    B, S = 2, 5
    for changes in ({}, dict(attention="gqa", num_key_value_heads=1), dict(attention="mha")):
        cfg = ModelConfig(**{**SMALL, **changes})
        model = build_model(cfg, dtype=torch.bfloat16)
        x = model.model.embed_tokens(torch.randint(0, cfg.vocab_size, (B, S)))  # [B, S, H]
        rope = model.rope(S)
        cache = []
        for layer in model.model.layers:
            h = layer.input_layernorm(x)
            if cfg.attention == "mla":
                kv_latent, k_rope = layer.self_attn.compress_kv(h, rope)  # [B, S, r_kv], [B, S, d_r]
                cache.append(torch.cat([kv_latent, k_rope], dim=-1))
            else:
                _, k, v = layer.self_attn.qkv(h, rope)  # [B, n_kv, S, d_qk], [B, n_kv, S, d_v]
                cache += [k, v]
            x, _ = layer(x, rope)
        cached = sum(t.numel() * t.element_size() for t in cache)
        assert cached / (B * S) == kv_cache_bytes_per_token(cfg, "bf16"), changes


def test_weight_bytes_by_dtype() -> None:
    cfg = ModelConfig(**{**SMALL, "num_nextn_predict_layers": 1})
    model = build_model(cfg, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert weight_bytes(cfg, "fp32") == 4 * n
    assert weight_bytes(cfg, "bfloat16") == 2 * n
    assert weight_bytes(cfg, "bf16", include_mtp=False) == 2 * param_counts(cfg).total
    # fp8: the block linears at 1 byte + one fp32 scale per 128x128 block (per expert for stacked
    # experts), everything else in bf16; computed here from the real parameters
    fp8 = scales = 0
    for name, p in model.named_parameters():
        in_block = ".self_attn." in name or (".mlp." in name and not name.endswith("mlp.gate.weight"))
        if p.dim() < 2 or not in_block:
            continue
        fp8 += p.numel()
        if name.endswith("gate_up_proj"):  # [E, 2*I_m, H]: gate and up, each [I_m, H], per expert
            E, rows2, cols = p.shape
            scales += 2 * E * math.ceil(rows2 // 2 / 128) * math.ceil(cols / 128)
        elif p.dim() == 3:  # down_proj [E, H, I_m]
            scales += p.shape[0] * math.ceil(p.shape[1] / 128) * math.ceil(p.shape[2] / 128)
        else:
            scales += math.ceil(p.shape[0] / 128) * math.ceil(p.shape[1] / 128)
    assert fp8_scale_bytes(cfg) == 4 * scales
    assert weight_bytes(cfg, "fp8") == fp8 + 4 * scales + 2 * (n - fp8)
    # DeepSeek-V3: the fp8 checkpoint is about 1 byte per parameter (685B with MTP)
    v3 = preset("deepseek-v3")
    assert 680e9 < weight_bytes(v3, "fp8") < 700e9
    with pytest.raises(ConfigError, match="dtype"):
        weight_bytes(cfg, "int3")


def _saved_bytes(cfg: ModelConfig, dtype: torch.dtype, B: int, S: int) -> float:
    """Bytes of the distinct non-parameter storages autograd saves for the backward of forward_train."""
    model = build_model(cfg, dtype=dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1 + cfg.num_nextn_predict_layers))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_train(tokens)
    return sum(saved.values())


@pytest.mark.parametrize("changes, dtype, tol", [
    (dict(num_nextn_predict_layers=1), torch.float32, 0.03),
    (dict(attention="gqa", num_key_value_heads=1), torch.float32, 0.03),
    (dict(q_lora_rank=None, ffn="dense"), torch.float32, 0.03),
    (dict(num_nextn_predict_layers=1), torch.bfloat16, 0.10),
])
def test_activations_match_saved_tensors(changes, dtype, tol) -> None:
    cfg = ModelConfig(**{**SMALL, **changes})
    S = 48
    measured = _saved_bytes(cfg, dtype, B=2, S=S)
    # d_qk > d_v here, so on the CPU v is padded to d_qk for the flash kernel (model.attention.CPU_FLASH_PAD_V)
    name = "fp32" if dtype == torch.float32 else "bf16"
    predicted = (2 * S * activation_bytes_per_token(cfg, S, dtype=name, fused_attention=True, pad_v=True)
                 + step_buffer_bytes(cfg, dtype=name))
    assert abs(predicted - measured) / measured < tol, (predicted, measured)


def test_recompute_and_attention_kernel() -> None:
    cfg = preset("deepseek-v3")
    full = activation_bytes_per_token(cfg, 4096)
    ckpt = activation_bytes_per_token(cfg, 4096, recompute=True)
    assert ckpt < full / 5
    # the math kernel keeps n_h*S fp32 probabilities per token and layer (62 blocks with MTP), not the
    # kernel's output (n_h*d_v at bf16) or its log-sum-exp
    math_path = activation_bytes_per_token(cfg, 4096, fused_attention=False)
    assert math_path - full == 62 * 128 * (4096 * 4 - 4 - 128 * 2)


def test_training_memory_breakdown() -> None:
    cfg = ModelConfig(**{**SMALL, "num_nextn_predict_layers": 1})
    n = param_counts(cfg).total_with_mtp
    fp32 = training_memory(cfg, 256, precision="fp32")
    assert (fp32.weights, fp32.master_weights, fp32.grads, fp32.optimizer) == (4 * n, 0, 4 * n, 8 * n)
    assert fp32.activations == 256 * activation_bytes_per_token(cfg, 256, dtype="fp32")
    assert fp32.step_buffers == step_buffer_bytes(cfg, dtype="fp32") > 0
    # DeepSeek-V3's recipe: bf16 weights, fp32 master and gradients, bf16 moments = 14 bytes a parameter
    v3 = training_memory(cfg, 256, precision="bf16", moments="bf16")
    assert v3.weights + v3.master_weights + v3.grads + v3.optimizer == 14 * n
    assert v3.total == sum(v for k, v in v3.as_dict().items() if k != "total")
    sharded = training_memory(cfg, 256, precision="bf16", shards=4)
    assert sharded.grads == math.ceil(4 * n / 4) and sharded.activations == v3.activations
    assert training_memory(cfg, 256, recompute=True).activations < v3.activations
    assert training_memory(cfg, 512).activations == 2 * training_memory(cfg, 256).activations
    with pytest.raises(ConfigError, match="batch_tokens"):
        training_memory(cfg, 0)
    require_fits(fp32, fp32.total)
    with pytest.raises(ResourceError, match="optimizer"):
        require_fits(fp32, fp32.total - 1, "the CPU")


@pytest.mark.parametrize("changes", [{}, dict(attention="gqa", num_key_value_heads=1), dict(attention="mha")])
def test_kv_cache_bytes_equal_the_serving_pool(changes) -> None:
    """What the serving engine's block pool allocates per token of context, built as the engine builds it."""
    cache = pytest.importorskip("frugallm.serve.cache")
    cfg = ModelConfig(**{**SMALL, **changes})
    layout = cache.CacheLayout(n_layers=cfg.num_hidden_layers, width=cache.entry_width(cfg), dtype=torch.bfloat16)
    pool = cache.BlockPool(layout, block_size=4, n_blocks=3)
    assert pool.total_bytes / (3 * 4) == kv_cache_bytes_per_token(cfg, "bf16")
