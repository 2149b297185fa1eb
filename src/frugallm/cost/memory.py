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
  attention: what the kernel policy's attention keeps (``KernelPolicy.attention_saved_bytes``: q, k, v and
    the flash kernel's output, n_h*(2*d_qk + 2*d_v) elements, and the fp32 log-sum-exp, n_h; v and the
    output n_h*d_qk each where the CPU pads v; or the blocked path's q, k, v and probabilities, about
    3*S/4 per token and head), and o_proj's input (n_h*d_v). PyTorch's math kernel
    (``fused_attention=False``) keeps the probabilities in fp32, 4*n_h*S bytes per token, instead of its
    output and log-sum-exp: this term grows with the sequence.
  FFN: SwiGLU keeps gate and up, silu(gate) and their product, 4*I. An MoE layer keeps the router's scores
    and top-k (4E + 12k + 8 bytes; plus an fp32 copy of its input, 4H, when activations are not fp32), per
    routed pair the gathered input H, 4*I_m and the expert output H (for the gate weight's gradient) and
    two int64 permutations, k*(2H + 4*I_m)*b + 16k, the k mixing gates, and the shared experts 4*n_s*I_m.
    Where the policy pads the experts' rows to bucket sizes (bf16 on the CPU), what that adds
    (``KernelPolicy.expert_padding_bytes``: up to 1/8 more rows of input and SwiGLU tensors, and a row map).
  head: the final norm, and the fused output head's fp32 input gradient, 4H: never the logits
    (``frugallm.model.loss``). Plus the token ids the embedding keeps, 8 bytes.
  MTP module: two norms on H, their concatenation 2H, one block and one head.
Per step, whatever the batch (``step_buffer_bytes``): the fused head's fp32 weight gradient V*H per head
pass, and the concatenated gate/up weight of each SwiGLU MLP.
FP8 GEMMs (``fp8_gemms``: the model converted by ``frugallm.precision.convert_to_fp8``, as ``frugallm train
--precision fp8`` does; every linear but the output head, and the routed experts; t the activation tile, 128):
  step buffers: each converted matrix keeps, from its forward to its backward, its e4m3 copy (1 byte per
    weight) and fp32 scales, 4 per block x block tile, partial tiles included: the decoder blocks' attention
    projections, dense FFNs, shared experts, routed experts (stacked gate_up [2 I_m, H] and down [H, I_m],
    per expert), and per MTP module its block and ``eh_proj``; not the embedding, head or router. No
    concatenated gate/up weight: converted linears are not fused, the MLP runs down(silu(gate(x)) * up(x)).
  activations, inputs saved as-is: unchanged. Each converted linear keeps its input (a reference to the same
    tensor the unconverted linear keeps), and the unfused MLP keeps gate, silu(gate), up and their product,
    4*I as the fused SwiGLU.
  activations, ``fp8_saved_activations``: each converted linear keeps its input as e4m3 x^T in 1 x t tiles
    along the tokens plus an fp32 scale per tile, (1 + 4/t) bytes per element instead of b. Two converted
    linears that read the same tensor keep a copy each: the attention's input norm (q_a_proj or q_proj, and
    kv_a_proj; q, k and v for GQA), the FFN norm (gate_proj and up_proj). A tensor another op keeps stays at
    b as well: the FFN norm's output feeds the MoE router, which keeps it itself in fp32 runs (in bf16 it
    keeps its own fp32 copy, so the bf16 output goes); swiglu keeps h and silu(g) (not its output). So
    r_q, r_kv, o_proj's n_h*d_v, the MLPs' product I, the routed pairs' input H and product I_m, and the
    MTP concatenation 2H go from b to 1 + 4/t; the input norm's H from b to 2 (1 + 4/t), or 3 with GQA; the
    FFN norm's H to 2 (1 + 4/t) with shared experts or a dense FFN. In bf16 a norm read by two linears
    costs more than before (2.0625 H against 2 H). The scales are exact when the micro-batch's B*S tokens
    are a multiple of t (one segment per linear); each routed expert quantizes its own m_e tokens, so a
    routed matrix has sum_e ceil(m_e/t) tiles, fewer than B*S*k/t + E, which depends on the routing and
    not on the token alone: counted as 4/t per element like the others, a slight underestimate.
With ``recompute=True`` (full activation checkpointing of each block) only every block's input H stays,
plus, during the backward, one block's activations at a time; the heads keep theirs either way. The step
buffers are counted for every block regardless (an upper bound with recomputation, where a checkpointed
block's concatenated or e4m3 weights live only while it is recomputed).
b is the dtype the model is cast to. Under ``torch.autocast`` the residual stream and norms stay fp32
and the bf16 copies come on top; the fp32 figure bounds that case (the cast weight copies autocast keeps
are the working weights of ``training_memory``).
This is an estimate of the live tensors, not of the allocator: fragmentation and temporary buffers add
to it, so the training loop should keep a margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction

from frugallm.config import ModelConfig
from frugallm.cost.params import param_counts, weight_matrices
from frugallm.errors import ConfigError, ResourceError
from frugallm.kernels.policy import KernelPolicy

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
            "float8": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8", "fp8_e4m3": "fp8"}
FP8_BLOCK = 128  # DeepSeek-V3's weight quantisation block, 128 x 128 (section 3.3.2)
FP8_PARTS = ("attention", "dense_ffn", "shared_expert", "routed_expert")
# what ``convert_to_fp8`` converts: the published checkpoint's fp8 matrices and, unlike it, the MTP eh_proj
FP8_GEMM_PARTS = (*FP8_PARTS, "mtp_proj")


def dtype_name(dtype: object) -> str:
    """Normalise 'bf16', 'bfloat16', torch.bfloat16 ... to one of DTYPE_BYTES' keys."""
    name = str(dtype).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return name


def dtype_bytes(dtype: object) -> int:
    return DTYPE_BYTES[dtype_name(dtype)]


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


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


def fp8_weight_copy_bytes(cfg: ModelConfig, *, include_mtp: bool = True, block: int = FP8_BLOCK) -> int:
    """The e4m3 copies and fp32 block scales that FP8 GEMMs (``convert_to_fp8``) keep per step: every
    matrix of FP8_GEMM_PARTS at 1 byte per weight, plus 4 bytes per block x block tile. The routed experts'
    gate and up are one stacked matrix per expert, [2 I_m, H], so they share blocks (``fp8_scale_bytes``
    counts them apart, as the published checkpoint stores them)."""
    _check_positive("fp8_block", block)
    total = 0
    for m in weight_matrices(cfg):
        if m.part not in FP8_GEMM_PARTS or (m.mtp and not include_mtp):
            continue
        rows = m.rows
        if m.part == "routed_expert" and m.name.endswith(".up_proj"):
            continue  # quantized with gate_proj, below
        if m.part == "routed_expert" and m.name.endswith(".gate_proj"):
            rows *= 2  # gate_up_proj [E, 2 I_m, H]
        total += m.count * (rows * m.cols + 4 * math.ceil(rows / block) * math.ceil(m.cols / block))
    return total


def grad_bytes(cfg: ModelConfig, dtype: object = "fp32") -> int:
    """Gradients of every trained parameter (MTP included); DeepSeek-V3 accumulates them in fp32."""
    return param_counts(cfg).total_with_mtp * dtype_bytes(dtype)


def optimizer_bytes(cfg: ModelConfig, moments: object = "fp32", *, master: bool = False) -> int:
    """AdamW's two moments in ``moments`` dtype, plus an fp32 master copy of the weights if ``master``."""
    return param_counts(cfg).total_with_mtp * (2 * dtype_bytes(moments) + (4 if master else 0))


# ----- activations ---------------------------------------------------------------------------------------
# Bytes per element of a converted linear's saved input with FP8-saved activations, 1 + 4/t as an exact
# fraction (None: inputs saved at the activation dtype); the per-token total is rounded up once at the end.
Fp8Saved = Fraction | None


def _norm_bytes(width: int, b: int, output_kept: bool = True) -> int:
    # the fp32 normalised value and the per-row 1/rms the backward reads; the output at the activation dtype
    # when the next op keeps it (a linear's input; not the fused head's, not the MTP concatenation's)
    return 4 * width + 4 + (b * width if output_kept else 0)


def _input_bytes(width: int, b: int, fp8: Fp8Saved, readers: int = 1) -> int | Fraction:
    # a linear's input: one tensor at the activation dtype, however many linears read it; with FP8-saved
    # activations each converted reader keeps its own e4m3 copy and scales
    return width * b if fp8 is None else readers * width * fp8


def _attention_activation_bytes(cfg: ModelConfig, b: int, seq_len: int, fused: bool, kernels: KernelPolicy,
                                micro_batch: int, fp8: Fp8Saved = None) -> int | Fraction:
    nh, d_qk, d_v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    readers = 2 if cfg.attention == "mla" else 3  # q (q_a_proj or q_proj) and kv_a_proj; or q, k, v
    out = _norm_bytes(cfg.hidden_size, b, output_kept=False) + _input_bytes(cfg.hidden_size, b, fp8, readers)
    if cfg.attention == "mla":
        out += _norm_bytes(cfg.kv_lora_rank, b, output_kept=False) + _input_bytes(cfg.kv_lora_rank, b, fp8)
        if cfg.q_lora_rank is not None:
            out += _norm_bytes(cfg.q_lora_rank, b, output_kept=False) + _input_bytes(cfg.q_lora_rank, b, fp8)
    if fused:  # the policy's kernel
        out += kernels.attention_saved_bytes(batch=micro_batch, heads=nh, seq=seq_len, d_qk=d_qk, d_v=d_v,
                                             elem_bytes=b)
    else:  # q, k, v and the fp32 probabilities
        out += nh * (2 * d_qk + d_v) * b + 4 * nh * seq_len
    return out + _input_bytes(nh * d_v, b, fp8)  # o_proj's input


def _ffn_activation_bytes(cfg: ModelConfig, moe: bool, b: int, kernels: KernelPolicy,
                          fp8: Fp8Saved = None, fp8_gemms: bool = False) -> int | Fraction:
    H = cfg.hidden_size
    norm = _norm_bytes(H, b, output_kept=False)
    if not moe:  # SwiGLU: gate and up (or h), silu(gate), and the product down_proj reads
        I = cfg.intermediate_size
        return norm + _input_bytes(H, b, fp8, readers=2) + 3 * I * b + _input_bytes(I, b, fp8)
    Im, k, E = cfg.moe_intermediate_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    Is = cfg.n_shared_experts * Im
    router = (4 * H if b != 4 else 0) + 4 * E + 4 + 12 * k + 4  # fp32 input copy, scores, top-k and gates
    if fp8 is None:  # the norm's output, kept by the router (fp32) or the shared experts' linear
        norm += H * b
    else:  # the router keeps the fp32 output itself (else its own copy); each shared expert linear an e4m3 one
        norm += (H * b if b == 4 else 0) + (2 * H * fp8 if Is else 0)
    # pairs: gathered input, SwiGLU's h and silu(g), its product, the output; two int64 permutations
    routed = k * (_input_bytes(H, b, fp8) + 3 * Im * b + _input_bytes(Im, b, fp8) + H * b) + 16 * k
    if not fp8_gemms:  # FP8 experts do not pad their rows
        routed += kernels.expert_padding_bytes(hidden=H, intermediate=Im, top_k=k, elem_bytes=b)
    shared = 3 * Is * b + _input_bytes(Is, b, fp8) if Is else 0
    return norm + router + routed + k * b + shared  # k b: mixing gates


def _head_activation_bytes(cfg: ModelConfig) -> int:
    # the final norm, then the fused head keeps only its input gradient (fp32): never the logits
    return _norm_bytes(cfg.hidden_size, 4, output_kept=False) + 4 * cfg.hidden_size


def activation_bytes_per_token(cfg: ModelConfig, seq_len: int, *, dtype: object = "bf16",
                               recompute: bool = False, fused_attention: bool = True,
                               include_mtp: bool = True, fp8_gemms: bool = False,
                               fp8_saved_activations: bool = False, fp8_tile: int = 128,
                               kernels: KernelPolicy | None = None, micro_batch: int = 1) -> int:
    """Activation bytes kept per trained token of a ``seq_len`` sequence (model in the module docstring),
    in a micro-batch of ``micro_batch`` sequences run on ``kernels`` (default: PyTorch's own kernels, as on
    a GPU). ``fp8_gemms``: the model converted to FP8 GEMMs (same activations); ``fp8_saved_activations``
    (needs ``fp8_gemms``): converted linears keep their inputs as e4m3 in 1 x ``fp8_tile`` tiles, rounded
    up."""
    if fp8_saved_activations and not fp8_gemms:
        raise ConfigError("fp8_saved_activations=True needs fp8_gemms=True: only FP8 linears save e4m3 inputs")
    _check_positive("fp8_tile", fp8_tile)
    _check_positive("micro_batch", micro_batch)
    kernels = kernels or KernelPolicy()
    b = dtype_bytes(dtype)
    H = cfg.hidden_size
    fp8 = Fraction(fp8_tile + 4, fp8_tile) if fp8_saved_activations else None

    def block(layer: int) -> int | Fraction:
        return (_attention_activation_bytes(cfg, b, seq_len, fused_attention, kernels, micro_batch, fp8)
                + _ffn_activation_bytes(cfg, cfg.is_moe_layer(layer), b, kernels, fp8, fp8_gemms))

    blocks = [block(i) for i in range(cfg.num_hidden_layers)]
    heads = 8 + _head_activation_bytes(cfg)  # 8: the token ids the embedding keeps
    if include_mtp:
        for d in range(cfg.num_nextn_predict_layers):
            blocks.append(2 * _norm_bytes(H, b, output_kept=False) + _input_bytes(2 * H, b, fp8)  # eh_proj's
                          + block(cfg.num_hidden_layers + d))
            heads += 8 + _head_activation_bytes(cfg)
    if not recompute:
        return math.ceil(sum(blocks) + heads)
    return math.ceil(len(blocks) * H * b + max(blocks) + heads)


def step_buffer_bytes(cfg: ModelConfig, *, dtype: object = "bf16", include_mtp: bool = True,
                      fp8_gemms: bool = False, fp8_block: int = FP8_BLOCK) -> int:
    """Bytes autograd keeps per step whatever the batch: the fused head's fp32 weight gradient, V x H, per
    head pass (main and each MTP depth), and the concatenated gate/up weight of every SwiGLU MLP (dense
    layers and shared experts), 2 I x H at the activation dtype. With ``fp8_gemms`` no concatenated weight
    (converted linears are not fused) but every converted matrix's e4m3 copy and block scales
    (``fp8_weight_copy_bytes``)."""
    b = dtype_bytes(dtype)
    H = cfg.hidden_size
    depths = cfg.num_nextn_predict_layers if include_mtp else 0
    if fp8_gemms:
        return (1 + depths) * 4 * cfg.vocab_size * H + fp8_weight_copy_bytes(cfg, include_mtp=include_mtp,
                                                                            block=fp8_block)
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
    return kv_cache_bytes(cfg, dtype, attention=attention, kv_heads=kv_heads)


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
                    master_weights: bool | None = None, fused_attention: bool = True,
                    seq_len: int | None = None, shards: int = 1, fp8_gemms: bool = False,
                    fp8_saved_activations: bool = False, kernels: KernelPolicy | None = None) -> TrainingMemory:
    """Memory to train ``cfg`` on ``batch_tokens`` tokens per step (micro-batch x sequence length) with
    working weights and activations in ``precision`` (fp32, bf16, or fp8 with bf16 activations).
    ``master_weights`` defaults to True unless ``precision`` is fp32. ``seq_len`` defaults to
    ``batch_tokens`` (one sequence), the worst case where attention keeps anything per key.
    ``kernels``: the kernel policy the model runs (``frugallm.kernels.choose``; default PyTorch's own, as
    on a GPU), which says what attention keeps and whether the experts pad their rows.
    ``shards`` divides weights, master copy, gradients and optimizer states (FSDP / ZeRO-3).
    ``fp8_gemms``: this package's FP8 training (``frugallm train --precision fp8``), the model's GEMMs
    converted to FP8 with ``precision`` (fp32 or bf16) its weights and activations: the e4m3 weight copies
    come as step buffers, unless ``shards`` > 1 (sharded runs quantize the weights again in the backward); ``fp8_saved_activations`` keeps the linears' inputs in e4m3 (module docstring).
    ``precision="fp8"`` (the published FP8 weight layout) implies FP8 GEMMs: activations as with
    ``fp8_gemms``, no concatenated gate/up weights, and no e4m3 copies, the weights being e4m3 already."""
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ConfigError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    if not isinstance(shards, int) or shards < 1:
        raise ConfigError(f"shards must be a positive integer, got {shards!r}")
    prec = dtype_name(precision)
    gemms = fp8_gemms or prec == "fp8"
    if fp8_saved_activations and not gemms:
        raise ConfigError("fp8_saved_activations=True needs fp8_gemms=True (or precision='fp8'): only FP8 "
                          "linears save e4m3 inputs")
    master = prec != "fp32" if master_weights is None else master_weights
    n = param_counts(cfg).total_with_mtp
    act_dtype = "bf16" if prec == "fp8" else prec
    seq = seq_len or batch_tokens
    acts = batch_tokens * activation_bytes_per_token(cfg, seq, dtype=act_dtype, recompute=recompute,
                                                     fused_attention=fused_attention, fp8_gemms=gemms,
                                                     fp8_saved_activations=fp8_saved_activations,
                                                     kernels=kernels, micro_batch=max(1, batch_tokens // seq))
    step = step_buffer_bytes(cfg, dtype=act_dtype, fp8_gemms=gemms)
    if prec == "fp8" or (gemms and shards > 1):
        # no e4m3 weight copies kept per step: the weights are e4m3 already, or a sharded run quantizes them
        # again in the backward instead (``Fp8Recipe.cache_weights``, turned off by frugallm.train.distributed)
        step -= fp8_weight_copy_bytes(cfg)
    return TrainingMemory(
        weights=-(-weight_bytes(cfg, prec) // shards),
        master_weights=-(-n * 4 // shards) if master else 0,
        grads=-(-grad_bytes(cfg, grad_dtype) // shards),
        optimizer=-(-optimizer_bytes(cfg, moments) // shards),
        activations=acts,
        step_buffers=step,
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
                            f"recomputation (--activation-checkpointing) or use bf16 optimizer moments "
                            f"(--adam-moments bf16)")


__all__ = ["DTYPE_BYTES", "FP8_BLOCK", "FP8_GEMM_PARTS", "TrainingMemory", "activation_bytes_per_token",
           "dtype_bytes", "dtype_name", "format_bytes", "fp8_scale_bytes", "fp8_weight_copy_bytes", "grad_bytes",
           "kv_cache_bytes_per_token", "kv_cache_elements_per_layer", "optimizer_bytes", "require_fits",
           "step_buffer_bytes", "training_memory", "weight_bytes"]


def kv_cache_bytes(cfg: ModelConfig, dtype: object = "bf16", *, layers: int | None = None,
                   attention: str | None = None, kv_heads: int | None = None) -> int:
    """The KV cache formula, for the cost model and the serving engine alike: bytes one token of context
    occupies, values per layer (``kv_cache_elements_per_layer``) x cached layers x the dtype's size.
    ``layers`` defaults to the main model's num_hidden_layers; the serving engine passes one more when the
    first MTP module drafts, since its block is cached too. DeepSeek-V3 in bf16: (512 + 64) * 61 * 2 = 70,272
    bytes (DeepSeek-V2, arXiv 2405.04434, section 2.1.3)."""
    n_layers = cfg.num_hidden_layers if layers is None else layers
    return kv_cache_elements_per_layer(cfg, attention, kv_heads) * n_layers * dtype_bytes(dtype)
