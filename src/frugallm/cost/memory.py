"""Memory from a ``ModelConfig``: weights by dtype, gradients, optimizer states, activations per token, the
KV cache per token, and ``training_memory``, the total the training loop checks before it starts.

Symbols as in ``flops.py``; b is the bytes of one activation element (2 in bf16).

Weights (``weight_bytes``)
- fp32 / bf16: every parameter, MTP modules included, at 4 / 2 bytes.
- fp8 (DeepSeek-V3 section 3.3, the layout of its published checkpoint): the linear layers inside the
  decoder blocks (attention projections, dense FFN, shared and routed experts) are E4M3, 1 byte per
  weight, plus one fp32 scale per 128 x 128 block, ceil(rows/128) * ceil(cols/128) * 4 bytes per matrix.
  Kept in bf16, as the report keeps them in higher precision: embedding, output head, MoE router, norms,
  and the MTP modules' ``eh_proj``.

Training states (``training_memory``), the mixed-precision recipe of DeepSeek-V3 section 3.3.3:
  gradients fp32 (4 bytes), AdamW moments fp32 or bf16 (2 x 4 or 2 x 2 bytes), and an fp32 master copy
  whenever the working weights are not fp32 (4 bytes). So bf16 weights + fp32 master + fp32 grads + bf16
  moments is 2 + 4 + 4 + 4 = 14 bytes per parameter; plain fp32 training is 4 + 4 + 8 = 16.

Activations per token (``activation_bytes_per_token``): the tensors autograd keeps for the backward in
this package's model, each counted once even when two ops save it (checked against
``saved_tensors_hooks`` in tests/test_cost_memory.py):
  RMSNorm keeps its fp32 normalised value and the per-row 1/rms, 4*W + 4 bytes, plus its output at the
    activation dtype when the next op keeps it (a linear's input). Each block has two on H; MLA adds one
    on r_q (when the query is compressed) and one on r_kv. RoPE keeps only per-position tables.
  attention: q, k, v and the kernel's output, n_h*(2*d_qk + 2*d_v) elements, the fp32 log-sum-exp (n_h)
    and o_proj's input (n_h*d_v). On the CPU v is padded to d_qk so that SDPA takes its flash kernel
    (``pad_v``): v and the output are then n_h*d_qk each. PyTorch's math kernel (``fused_attention=False``)
    keeps the probabilities in fp32, 4*n_h*S bytes per token, instead of its output and log-sum-exp: this
    term grows with the sequence.
  FFN: SwiGLU keeps gate and up, silu(gate) and their product, 4*I. An MoE layer keeps the router's scores
    and top-k (4E + 12k + 8 bytes; plus an fp32 copy of its input, 4H, when activations are not fp32), per
    routed pair the gathered input H, 4*I_m and the expert output H (for the gate weight's gradient) and
    two int64 permutations, k*(2H + 4*I_m)*b + 16k, the k mixing gates, and the shared experts 4*n_s*I_m.
  head: the final norm, and the fused output head's fp32 input gradient, 4H: never the logits
    (``frugallm.model.loss``). Plus the token ids the embedding keeps, 8 bytes.
  MTP module: two norms on H, their concatenation 2H, one block and one head.
Per step, whatever the batch (``step_buffer_bytes``): the fused head's fp32 weight gradient V*H per head
pass, and the concatenated gate/up weight of each SwiGLU MLP.
With ``recompute=True`` (full activation checkpointing of each block) only every block's input H stays,
plus, during the backward, one block's activations at a time; the heads keep theirs either way.
b is the dtype the model is cast to. Under ``torch.autocast`` the residual stream and norms stay fp32
and the bf16 copies come on top; the fp32 figure bounds that case (the cast weight copies autocast keeps
are the working weights of ``training_memory``).
This is an estimate of the live tensors, not of the allocator: fragmentation and temporary buffers add
to it, so the training loop should keep a margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from frugallm.config import ModelConfig
from frugallm.cost.params import param_counts, weight_matrices
from frugallm.errors import ConfigError, ResourceError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
            "float8": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8", "fp8_e4m3": "fp8"}
FP8_BLOCK = 128  # DeepSeek-V3's weight quantisation block, 128 x 128 (section 3.3.2)
FP8_PARTS = ("attention", "dense_ffn", "shared_expert", "routed_expert")


def dtype_name(dtype: object) -> str:
    """Normalise 'bf16', 'bfloat16', torch.bfloat16 ... to one of DTYPE_BYTES' keys."""
    name = str(dtype).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return name


def dtype_bytes(dtype: object) -> int:
    return DTYPE_BYTES[dtype_name(dtype)]


# ----- weights and training states ----------------------------------------------------------------------
def fp8_scale_bytes(cfg: ModelConfig, *, include_mtp: bool = True, block: int = FP8_BLOCK) -> int:
    """fp32 block scales of the fp8 matrices: one per block x block tile, partial tiles included."""
    return sum(4 * math.ceil(m.rows / block) * math.ceil(m.cols / block) * m.count
               for m in weight_matrices(cfg) if m.part in FP8_PARTS and (include_mtp or not m.mtp))


def weight_bytes(cfg: ModelConfig, dtype: object = "bf16", *, include_mtp: bool = True) -> int:
    """Bytes of the weights stored in ``dtype`` (fp32, bf16, fp16 or fp8 with its block scales)."""
    name = dtype_name(dtype)
    counts = param_counts(cfg)
    if name != "fp8":
        return (counts.total_with_mtp if include_mtp else counts.total) * DTYPE_BYTES[name]
    fp8 = sum(m.numel for m in weight_matrices(cfg) if m.part in FP8_PARTS and (include_mtp or not m.mtp))
    total = counts.total_with_mtp if include_mtp else counts.total
    return fp8 + fp8_scale_bytes(cfg, include_mtp=include_mtp) + (total - fp8) * DTYPE_BYTES["bf16"]


def grad_bytes(cfg: ModelConfig, dtype: object = "fp32") -> int:
    """Gradients of every trained parameter (MTP included); DeepSeek-V3 accumulates them in fp32."""
    return param_counts(cfg).total_with_mtp * dtype_bytes(dtype)


def optimizer_bytes(cfg: ModelConfig, moments: object = "fp32", *, master: bool = False) -> int:
    """AdamW's two moments in ``moments`` dtype, plus an fp32 master copy of the weights if ``master``."""
    return param_counts(cfg).total_with_mtp * (2 * dtype_bytes(moments) + (4 if master else 0))


# ----- activations ---------------------------------------------------------------------------------------
def _norm_bytes(width: int, b: int, output_kept: bool = True) -> int:
    # the fp32 normalised value and the per-row 1/rms the backward reads; the output at the activation dtype
    # when the next op keeps it (a linear's input; not the fused head's, not the MTP concatenation's)
    return 4 * width + 4 + (b * width if output_kept else 0)


def _attention_activation_bytes(cfg: ModelConfig, b: int, seq_len: int, fused: bool, pad_v: bool) -> int:
    nh, d_qk, d_v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    out = _norm_bytes(cfg.hidden_size, b)
    if cfg.attention == "mla":
        out += _norm_bytes(cfg.kv_lora_rank, b)
        out += _norm_bytes(cfg.q_lora_rank, b) if cfg.q_lora_rank is not None else 0
    if fused:  # q, k, v and the kernel's output (v and output padded to d_qk when pad_v), log-sum-exp
        d_vk = max(d_v, d_qk) if pad_v else d_v
        out += nh * (2 * d_qk + 2 * d_vk) * b + 4 * nh
    else:  # q, k, v and the fp32 probabilities
        out += nh * (2 * d_qk + d_v) * b + 4 * nh * seq_len
    return out + nh * d_v * b  # o_proj's input


def _ffn_activation_bytes(cfg: ModelConfig, moe: bool, b: int) -> int:
    H = cfg.hidden_size
    if not moe:
        return _norm_bytes(H, b) + 4 * cfg.intermediate_size * b
    Im, k, E = cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    router = (4 * H if b != 4 else 0) + 4 * E + 4 + 12 * k + 4  # fp32 input copy, scores, top-k and gates
    routed = k * (2 * H + 4 * Im) * b + 16 * k  # pairs: gathered input, SwiGLU, output; two permutations
    return _norm_bytes(H, b) + router + routed + k * b + 4 * cfg.n_shared_experts * Im * b  # k b: mixing gates


def _head_activation_bytes(cfg: ModelConfig) -> int:
    # the final norm, then the fused head keeps only its input gradient (fp32): never the logits
    return _norm_bytes(cfg.hidden_size, 4, output_kept=False) + 4 * cfg.hidden_size


def activation_bytes_per_token(cfg: ModelConfig, seq_len: int, *, dtype: object = "bf16",
                               recompute: bool = False, fused_attention: bool = True, pad_v: bool = False,
                               include_mtp: bool = True) -> int:
    """Activation bytes kept per trained token of a ``seq_len`` sequence (model in the module docstring)."""
    b = dtype_bytes(dtype)
    H = cfg.hidden_size
    blocks = [(_attention_activation_bytes(cfg, b, seq_len, fused_attention, pad_v)
               + _ffn_activation_bytes(cfg, cfg.is_moe_layer(i), b)) for i in range(cfg.num_hidden_layers)]
    heads = 8 + _head_activation_bytes(cfg)  # 8: the token ids the embedding keeps
    if include_mtp:
        for d in range(cfg.num_nextn_predict_layers):
            blocks.append(2 * _norm_bytes(H, b, output_kept=False) + 2 * H * b
                          + _attention_activation_bytes(cfg, b, seq_len, fused_attention, pad_v)
                          + _ffn_activation_bytes(cfg, cfg.is_moe_layer(cfg.num_hidden_layers + d), b))
            heads += 8 + _head_activation_bytes(cfg)
    if not recompute:
        return sum(blocks) + heads
    return len(blocks) * H * b + max(blocks) + heads


def step_buffer_bytes(cfg: ModelConfig, *, dtype: object = "bf16", include_mtp: bool = True) -> int:
    """Bytes autograd keeps per step whatever the batch: the fused head's fp32 weight gradient, V x H, per
    head pass (main and each MTP depth), and the concatenated gate/up weight of every SwiGLU MLP (dense
    layers and shared experts), 2 I x H at the activation dtype."""
    b = dtype_bytes(dtype)
    H = cfg.hidden_size
    depths = cfg.num_nextn_predict_layers if include_mtp else 0
    n_layers = cfg.num_hidden_layers + depths
    mlp = 0
    for i in range(n_layers):
        if not cfg.is_moe_layer(i):
            mlp += 2 * cfg.intermediate_size * H * b
        elif cfg.n_shared_experts:
            mlp += 2 * cfg.moe_intermediate_size * cfg.n_shared_experts * H * b
    return (1 + depths) * 4 * cfg.vocab_size * H + mlp


# ----- KV cache ------------------------------------------------------------------------------------------
def kv_cache_elements_per_layer(cfg: ModelConfig, attention: str | None = None,
                                kv_heads: int | None = None) -> int:
    """Values cached per token and layer. MLA: the latent and the shared rope key, r_kv + d_r
    (DeepSeek-V2 table 1: d_c + d_R). MHA/GQA as our GQA class caches them: n_kv * (d_qk + d_v), with
    RoPE applied inside the key's last d_r dims. ``attention`` and ``kv_heads`` give the equivalent of
    another attention kind with the same head dims (mha: n_kv = n_h)."""
    kind = attention or cfg.attention
    if kind == "mla":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if kind not in ("mha", "gqa"):
        raise ConfigError(f"attention must be one of mla, mha, gqa, got {kind!r}")
    if kv_heads is None:
        kv_heads = cfg.kv_heads if kind == cfg.attention else cfg.num_attention_heads
    if kind == "gqa" and (kv_heads < 1 or cfg.num_attention_heads % kv_heads):
        raise ConfigError(f"kv_heads must divide num_attention_heads={cfg.num_attention_heads}, got {kv_heads}")
    return kv_heads * (cfg.qk_head_dim + cfg.v_head_dim)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: object = "bf16", *, attention: str | None = None,
                             kv_heads: int | None = None) -> int:
    """KV cache bytes per token over all layers (MTP modules excluded: they are not cached for serving).
    DeepSeek-V3 in bf16: (512 + 64) * 61 * 2 = 70,272 bytes."""
    return kv_cache_elements_per_layer(cfg, attention, kv_heads) * cfg.num_hidden_layers * dtype_bytes(dtype)


# ----- the total the training loop checks ----------------------------------------------------------------
@dataclass(frozen=True)
class TrainingMemory:
    """Bytes per replica (divided by ``shards`` for the states a sharded data-parallel run splits)."""

    weights: int
    master_weights: int
    grads: int
    optimizer: int
    activations: int
    step_buffers: int = 0  # per-step tensors autograd keeps whatever the batch (``step_buffer_bytes``)

    @property
    def total(self) -> int:
        return (self.weights + self.master_weights + self.grads + self.optimizer + self.activations
                + self.step_buffers)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def training_memory(cfg: ModelConfig, batch_tokens: int, *, precision: object = "bf16",
                    moments: object = "fp32", recompute: bool = False, grad_dtype: object = "fp32",
                    master_weights: bool | None = None, fused_attention: bool = True, pad_v: bool = False,
                    seq_len: int | None = None, shards: int = 1) -> TrainingMemory:
    """Memory to train ``cfg`` on ``batch_tokens`` tokens per step (micro-batch x sequence length) with
    working weights and activations in ``precision`` (fp32, bf16, or fp8 with bf16 activations).
    ``master_weights`` defaults to True unless ``precision`` is fp32. ``seq_len`` matters only with
    ``fused_attention=False``; it defaults to ``batch_tokens`` (one sequence), the worst case.
    ``shards`` divides weights, master copy, gradients and optimizer states (FSDP / ZeRO-3)."""
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ConfigError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"shards must be a positive integer, got {shards!r}")
    prec = dtype_name(precision)
    master = prec != "fp32" if master_weights is None else master_weights
    n = param_counts(cfg).total_with_mtp
    act_dtype = "bf16" if prec == "fp8" else prec
    acts = batch_tokens * activation_bytes_per_token(cfg, seq_len or batch_tokens, dtype=act_dtype,
                                                     recompute=recompute, fused_attention=fused_attention,
                                                     pad_v=pad_v)
    return TrainingMemory(
        weights=-(-weight_bytes(cfg, prec) // shards),
        master_weights=-(-n * 4 // shards) if master else 0,
        grads=-(-grad_bytes(cfg, grad_dtype) // shards),
        optimizer=-(-optimizer_bytes(cfg, moments) // shards),
        activations=acts,
        step_buffers=step_buffer_bytes(cfg, dtype=act_dtype),
    )


def format_bytes(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def require_fits(mem: TrainingMemory, available_bytes: int, where: str = "the device") -> None:
    """Raise ``ResourceError`` naming the breakdown when ``mem`` exceeds ``available_bytes``."""
    if mem.total > available_bytes:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in asdict(mem).items() if v)
        raise ResourceError(f"training needs about {format_bytes(mem.total)} but {where} has "
                            f"{format_bytes(available_bytes)} ({parts}); reduce the batch, enable "
                            f"recomputation or use bf16 optimizer moments")


__all__ = ["DTYPE_BYTES", "FP8_BLOCK", "TrainingMemory", "activation_bytes_per_token", "dtype_bytes",
           "dtype_name", "format_bytes", "fp8_scale_bytes", "grad_bytes", "kv_cache_bytes_per_token",
           "kv_cache_elements_per_layer", "optimizer_bytes", "require_fits", "training_memory",
           "weight_bytes"]
