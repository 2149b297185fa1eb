"""The memory model: KV cache bytes against tensors the model produces, weights by dtype against the real
parameters, activations against the tensors autograd saves, and the training total."""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

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
from frugallm.kernels import KernelPolicy, choose
from frugallm.kernels.policy import bucket_rows
from frugallm.model import build_model
from frugallm.precision import Fp8Recipe, convert_to_fp8
from frugallm.precision.fp8_linear import Fp8GroupedExperts, Fp8Linear
from frugallm.serve.cache import BlockPool, CacheLayout, entry_width
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


def _saved(cfg: ModelConfig, dtype: torch.dtype, B: int, S: int, fp8: bool | None = None,
           kernels: KernelPolicy | None = None) -> tuple[int, torch.Tensor | None]:
    """Bytes of the distinct non-parameter storages autograd saves for the backward of forward_train, and
    the tokens each expert of each MoE layer received. ``fp8``: the model converted to FP8 GEMMs (emulated),
    with its linears' inputs saved in e4m3 when True. ``kernels``: default, the CPU's for ``dtype``."""
    model = build_model(cfg, dtype=dtype, kernels=kernels)
    if fp8 is not None:
        convert_to_fp8(model, Fp8Recipe(backend="emulated", fp8_saved_activations=fp8))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1 + cfg.num_nextn_predict_layers),
                           generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward_train(tokens)
    return sum(saved.values()), out.loads


def _saved_bytes(cfg: ModelConfig, dtype: torch.dtype, B: int, S: int, fp8: bool | None = None,
                 kernels: KernelPolicy | None = None) -> int:
    return _saved(cfg, dtype, B, S, fp8, kernels)[0]


def _predicted(cfg: ModelConfig, dtype: torch.dtype, B: int, S: int, fp8: bool | None = None,
               kernels: KernelPolicy | None = None) -> int:
    # the policy the model ran says what attention keeps (d_qk > d_v here: v padded for the CPU's flash
    # kernel, or float32's blocked path) and whether bf16 experts pad their rows
    name = "fp32" if dtype == torch.float32 else "bf16"
    gemms = fp8 is not None
    return (B * S * activation_bytes_per_token(cfg, S, dtype=name, fused_attention=True, fp8_gemms=gemms,
                                               fp8_saved_activations=bool(fp8),
                                               kernels=kernels or choose("cpu", dtype), micro_batch=B)
            + step_buffer_bytes(cfg, dtype=name, fp8_gemms=gemms))


MOE_MTP, DENSE = dict(num_nextn_predict_layers=1), dict(q_lora_rank=None, ffn="dense")


@pytest.mark.parametrize("changes, dtype, fp8, tol", [
    (MOE_MTP, torch.float32, None, 0.03),
    (dict(attention="gqa", num_key_value_heads=1), torch.float32, None, 0.03),
    (DENSE, torch.float32, None, 0.03),
    (MOE_MTP, torch.bfloat16, None, 0.10),
    # converted to FP8 GEMMs, linears' inputs saved as they are (False) or in e4m3 (True)
    (MOE_MTP, torch.float32, False, 0.03),
    (MOE_MTP, torch.float32, True, 0.03),
    (DENSE, torch.float32, False, 0.03),
    (DENSE, torch.float32, True, 0.03),
    (MOE_MTP, torch.bfloat16, True, 0.10),
])
def test_activations_match_saved_tensors(changes, dtype, fp8, tol) -> None:
    cfg = ModelConfig(**{**SMALL, **changes})
    # float32 rows measure the blocked path
    assert choose("cpu", "fp32").attention_path(2, cfg.num_attention_heads, 64, 4) == "blocked"
    S = 48 if fp8 is None else 64  # FP8: B*S = 128 tokens, one whole 1 x 128 scale tile per saved input row
    measured = _saved_bytes(cfg, dtype, B=2, S=S, fp8=fp8)
    predicted = _predicted(cfg, dtype, B=2, S=S, fp8=fp8)
    assert abs(predicted - measured) / measured < tol, (predicted, measured)


@pytest.mark.parametrize("changes", [MOE_MTP, dict(attention="gqa", num_key_value_heads=1)])
def test_activations_match_saved_tensors_through_the_flash_kernel(changes) -> None:
    """float32 attention with the blocked path off: SDPA's flash kernel, v padded, as bf16 always runs; and
    PyTorch's own kernels, v unpadded, which on the CPU is SDPA's math path (the probabilities kept)."""
    cfg = ModelConfig(**{**SMALL, **changes})
    padded = replace(choose("cpu", "fp32"), attention="pad-v")
    measured = _saved_bytes(cfg, torch.float32, B=2, S=48, kernels=padded)
    predicted = _predicted(cfg, torch.float32, B=2, S=48, kernels=padded)
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)
    plain = KernelPolicy()
    measured = _saved_bytes(cfg, torch.float32, B=2, S=48, kernels=plain)
    predicted = (2 * 48 * activation_bytes_per_token(cfg, 48, dtype="fp32", fused_attention=False, kernels=plain)
                 + step_buffer_bytes(cfg, dtype="fp32"))
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


@pytest.mark.parametrize("changes, dtype, fp8", [
    (MOE_MTP, torch.float32, False), (MOE_MTP, torch.float32, True), (DENSE, torch.float32, False),
    (DENSE, torch.float32, True), (MOE_MTP, torch.bfloat16, True),
])
def test_fp8_conversion_changes_saved_tensors_as_predicted(changes, dtype, fp8) -> None:
    """What converting to FP8 GEMMs changes in the saved tensors, to the byte: the step buffers (e4m3
    weights and scales in, concatenated gate/up weights out) and the linears' inputs. The model's other
    small terms cancel in the difference, so a wrong FP8 term cannot hide in the tolerance above."""
    cfg = ModelConfig(**{**SMALL, **changes})
    B, S = 2, 64
    plain, plain_loads = _saved(cfg, dtype, B, S)
    converted, loads = _saved(cfg, dtype, B, S, fp8)
    predicted = _predicted(cfg, dtype, B, S, fp8) - _predicted(cfg, dtype, B, S)
    if dtype == torch.bfloat16 and plain_loads is not None:
        # the unconverted bf16 experts pad their rows to bucket sizes, which the model counts at its 1/8 bound
        # and the converted ones do not: the bound out, the padding this routing made in
        b, H, Im, k = 2, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        layers = plain_loads.shape[0]
        bound = layers * B * S * (k * Fraction((H + 4 * Im) * b, 8) + 8 * k)
        padding = sum(bucket_rows(m) - m for m in plain_loads.flatten().tolist()) * (H + 4 * Im) * b
        predicted += bound - (padding + layers * B * S * 8 * k)
    if fp8 and loads is not None:
        # each routed expert quantizes its own m_e tokens, ceil(m_e / 128) tiles, where the per-token model
        # counts B*S*k / 128: the scales of the two grouped GEMMs' inputs (K = H, then I_m), per MoE layer
        tiles = sum(math.ceil(m / 128) for m in loads.flatten().tolist())
        tiles -= loads.shape[0] * B * S * cfg.num_experts_per_tok / 128
        predicted += 4 * (cfg.hidden_size + cfg.moe_intermediate_size) * tiles
    # activation_bytes_per_token rounds its fraction of a byte up once: less than a byte per token
    assert 0 <= predicted - (converted - plain) < (B * S if fp8 else 1), (predicted, converted - plain)


def test_fp8_saved_activations_at_deepseek_v3_scale() -> None:
    cfg = preset("deepseek-v3")
    plain = activation_bytes_per_token(cfg, 4096)
    assert activation_bytes_per_token(cfg, 4096, fp8_gemms=True) == plain  # the same tensors kept
    fp8 = activation_bytes_per_token(cfg, 4096, fp8_gemms=True, fp8_saved_activations=True)
    # bf16 (b = 2) against 1 + 4/128 = 33/32 bytes per element of a converted linear's input, per token:
    #   attention (62 blocks, MTP's included): r_q + r_kv + n_h*d_v = 1536 + 512 + 16384 go from 2 to 33/32,
    #     the input norm's H = 7168 from 2 to 2 x 33/32 (q_a_proj and kv_a_proj each keep a copy):
    #     18432 * 31/32 - 7168 / 16 = 17408
    #   dense FFN (3 layers): I = 18432 from 2 to 33/32, the norm's H to two copies: 17408
    #   MoE (58 + MTP's): per routed pair H + I_m = 9216, shared expert's product I_m = 2048 from 2 to 33/32;
    #     the norm's bf16 output goes (the router keeps its fp32 copy), two e4m3 copies come for the shared
    #     expert's gate and up: 8 * 9216 * 31/32 + 2048 * 31/32 - 7168 / 16 = 72960
    #   MTP: the concatenation 2H = 14336 read by eh_proj: 14336 * 31/32 = 13888
    assert plain - fp8 == 62 * 17408 + 3 * 17408 + 59 * 72960 + 13888 == 5_450_048  # 12.7% of 42,960,168
    assert activation_bytes_per_token(cfg, 4096, recompute=True, fp8_gemms=True, fp8_saved_activations=True) < \
        activation_bytes_per_token(cfg, 4096, recompute=True)
    with pytest.raises(ConfigError, match="fp8_saved_activations.*fp8_gemms"):
        activation_bytes_per_token(cfg, 4096, fp8_saved_activations=True)
    with pytest.raises(ConfigError, match="fp8_tile"):
        activation_bytes_per_token(cfg, 4096, fp8_gemms=True, fp8_saved_activations=True, fp8_tile=0)


def test_training_memory_fp8_step_buffers_are_the_converted_weights() -> None:
    """Per step, FP8 GEMMs keep every converted matrix in e4m3 plus one fp32 scale per 128 x 128 block
    (partial blocks included, per expert for stacked experts), counted here from the converted model."""
    # hidden 160 and I 200: partial blocks; I_m = 16: the stacked gate_up [2 I_m, H] is one block row, where
    # gate and up apart would be two
    cfg = ModelConfig(**{**SMALL, "hidden_size": 160, "intermediate_size": 200, "num_nextn_predict_layers": 1})
    model = convert_to_fp8(build_model(cfg, device="meta"), Fp8Recipe(backend="emulated"))
    copies = n_matrices = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            weights = [module.weight]
        elif isinstance(module, Fp8GroupedExperts):
            weights = [module.gate_up_proj, module.down_proj]
        else:
            continue
        for w in weights:
            *experts, rows, cols = w.shape
            copies += math.prod(experts) * (rows * cols + 4 * math.ceil(rows / 128) * math.ceil(cols / 128))
            n_matrices += 1
    assert n_matrices == 3 * 5 + 3 + 2 * 5 + 1  # 3 blocks' attention, a dense FFN, 2 MoE FFNs, MTP eh_proj
    head = 2 * 4 * cfg.vocab_size * cfg.hidden_size  # the fused head's fp32 weight gradient, main and MTP
    plain = training_memory(cfg, 256, precision="fp32")
    fp8 = training_memory(cfg, 256, precision="fp32", fp8_gemms=True)
    assert fp8.step_buffers == head + copies
    assert training_memory(cfg, 256, precision="bf16", fp8_gemms=True).step_buffers == head + copies
    assert (fp8.weights, fp8.master_weights, fp8.grads, fp8.optimizer, fp8.activations) == (
        plain.weights, plain.master_weights, plain.grads, plain.optimizer, plain.activations)
    saved = training_memory(cfg, 256, precision="fp32", fp8_gemms=True, fp8_saved_activations=True)
    assert saved.activations < fp8.activations and saved.step_buffers == fp8.step_buffers
    # sharded (FSDP) runs quantize the weights again in the backward instead of keeping whole e4m3 copies
    assert training_memory(cfg, 256, precision="fp32", fp8_gemms=True, shards=2).step_buffers == head
    # the published FP8 layout: the weights already are e4m3 (in ``weights``), no per-step copy of them
    published = training_memory(cfg, 256, precision="fp8")
    assert published.step_buffers == head
    assert training_memory(cfg, 256, precision="fp8", fp8_gemms=True) == published
    assert training_memory(cfg, 256, precision="fp8", fp8_saved_activations=True).activations < published.activations
    with pytest.raises(ConfigError, match="fp8_saved_activations.*fp8_gemms"):
        training_memory(cfg, 256, precision="bf16", fp8_saved_activations=True)


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
    cfg = ModelConfig(**{**SMALL, **changes})
    layout = CacheLayout(n_layers=cfg.num_hidden_layers, width=entry_width(cfg), dtype=torch.bfloat16)
    pool = BlockPool(layout, block_size=4, n_blocks=3)
    assert pool.total_bytes / (3 * 4) == kv_cache_bytes_per_token(cfg, "bf16")
