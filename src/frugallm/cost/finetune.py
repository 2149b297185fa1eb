"""What adapting open weights costs: LoRA parameter counts, memory per GPU for LoRA over a bf16 or an FP8 base
and for full fine-tuning, the GPUs each needs, and FLOPs, GPU-hours and dollars per trained token. Pure
functions of a ``ModelConfig``; the target patterns and their rule are ``frugallm.tune.targets``'s, shared
with the LoRA module.

Symbols: N parameters (MTP modules included), P LoRA parameters, r rank, H hidden, I_m expert width, E
routed experts, k experts per token, G GPUs, b = 2 bytes (bf16 activations), T tokens per micro-batch
(micro_batch x seq_len).

Modules (``model_modules``): the walk of the module tree the config implies, with the names and shapes of
``DeepseekV3LM.named_modules()`` (tested equal on a model built on the meta device): every module that holds
a parameter, in model order. It is what patterns are matched against, so a pattern that matches nothing
can be reported with the names that exist.

LoRA parameters (``lora_parameter_count``; Hu et al., arXiv 2106.09685): a linear [out, in] gets A [r, in]
and B [out, r], r * (in + out). The routed experts of a layer get one adapter per expert for the fused
gate_up [2 I_m, H] and one for down [H, I_m], E * (r * (H + 2 I_m) + r * (I_m + H)), the layout of
``frugallm.tune.lora.LoraExperts`` and of PEFT's ``target_parameters`` on transformers 5's fused experts.
Which modules: ``frugallm.tune.targets`` (dot-boundary suffix or ``re:`` patterns; the default set is every
linear of the decoder blocks and the routed experts, MTP modules excluded unless ``lora_mtp``).

Memory per GPU (``finetune_memory``), states sharded evenly over G GPUs (FSDP for every parameter, expert
parallelism splitting the routed experts the same way, so each GPU holds 1/G of every state; real layouts
round G to a count that splits the experts evenly, ``FinetuneGpus.gpus``), activations per GPU for its own
micro-batch:
- Base weights. bf16: 2 N bytes. fp8, the published checkpoint's layout (DeepSeek-V3 section 3.3 and its
  ``weight_scale_inv`` tensors; ``memory.weight_bytes``): the linears of the decoder blocks (attention
  projections, dense FFN, shared and routed experts, per expert gate, up and down) as e4m3, 1 byte per
  element, plus one fp32 scale per 128 x 128 block, 4 bytes per block, about 4 / 128^2 = 0.000244 bytes per
  element; the embedding, output head, router, norms and the MTP ``eh_proj`` stay bf16.
- Gathered layer (G > 1): FSDP all-gathers one block's weights while it runs: its non-expert weights whole
  and its routed experts still split G ways, at the stored precision; the largest block counts.
- LoRA: the base is frozen (no gradient, no optimizer state). The adapters in ``adapter_dtype`` (float32,
  the LoRA module's default, is its own master copy), their gradients in the same dtype, AdamW's two
  moments in ``adam_moments``: (4 + 4 + 2 x 4) P bytes by default.
- Full fine-tuning: ``memory.training_memory``'s accounting, as ``frugallm cost`` prints it: bf16 working
  weights 2 N, fp32 master 4 N, fp32 gradients 4 N, AdamW moments 2 x 4 N (or 2 x 2 N). There is no full
  fine-tuning over an FP8 base: the update needs a high-precision master, and an fp8 checkpoint is
  dequantized to a bf16 base first (``ConfigError`` otherwise).
- Activations: ``memory.activation_bytes_per_token`` (bf16, MTP modules included, ``--activation-
  checkpointing`` as full recomputation of each block) times T, for both methods. Why LoRA keeps as much:
  a frozen layer needs no weight gradient, but the adapters below it need the input gradient through it,
  dx = dy W^T, and through every norm, SwiGLU, attention and router between, which keep what they keep in
  full training; and each adapted linear's input x, which the frozen base would not need, is kept by its
  adapter for dA. With the default targets every block linear is adapted, so every linear input is kept
  and the count is the full training one; with fewer targets it is an upper bound (a frozen, unadapted
  linear's input need not be kept). An FP8 base dequantizes W for dx only and keeps nothing of its own,
  so its activations are the bf16 base's. On top, each adapter keeps its low-rank intermediate x A^T,
  r elements at b per token and adapted linear (per routed pair for the experts, two per pair).
- Step buffers, whatever the batch. Full: ``memory.step_buffer_bytes`` (the fused head's fp32 weight
  gradient V x H per head pass, the concatenated gate/up weights). LoRA: the head is frozen, so the fused
  loss computes no weight gradient, and unadapted frozen gate/up linears are not fused (``fuse_linears``
  needs weights that require grad; adapted ones over a plain base are concatenated per step on a GPU, a
  transient copy of one layer's fused weights, and kept only on the CPU, ``LoraLinear.project_together``);
  but each adapter's factors are cast to the compute dtype for its GEMMs and
  autograd keeps the casts for the input gradient, b bytes per adapter parameter when ``adapter_dtype`` is
  not bf16: the non-expert adapters whole (FSDP gathers them with their layer), the experts' 1/G (each GPU
  runs its own experts).
Not counted: the allocator's fragmentation, NCCL buffers, and the transient bf16 copy of a weight an FP8
base dequantizes for one GEMM.

FLOPs per trained token (``finetune_flops_per_token``), on ``flops.py``'s counting: full fine-tuning is
training, 3 x the forward (forward, input gradient, weight gradient). LoRA: the forward F, the input
gradient through every frozen weight and attention (another F: dx = dy W^T costs what y = x W costs,
attention's backward minus nothing, since q, k and v all depend on the input), no weight gradient of
the base, and the adapters' own forward, input gradient and weight gradient, 3 x 2 r (in + out) per token
and adapted linear (k routed pairs for the experts): 2 F + 3 F_adapters, about 4 N_active against 6 N_active.
(An upper bound by the first block's input projections, whose input gradient nobody needs.)

Time and dollars (``finetune_estimate``): GPU-hours = tokens x FLOPs per token / (MFU x bf16 peak), the
GEMMs running in bf16 (an FP8 base is dequantized for them). The MFU defaults to the one DeepSeek-V3's
pre-training achieved (``cluster.toml``: its GPU-hours per trillion tokens on H800, our FLOP count), an
assumption to override with a measured one; the price is the hardware catalogue's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from frugallm.config import ModelConfig, preset
from frugallm.cost.cluster import achieved_flops_from_gpu_hours, load_cluster
from frugallm.cost.flops import forward_flops_per_token, train_flops_per_token
from frugallm.cost.hardware import Device, get_device
from frugallm.cost.memory import (
    FP8_BLOCK,
    FP8_PARTS,
    activation_bytes_per_token,
    dtype_bytes,
    dtype_name,
    training_memory,
)
from frugallm.cost.params import param_counts
from frugallm.errors import ConfigError
from frugallm.tune.targets import (
    DEFAULT_TARGETS,
    NEVER_TARGETED,
    invalid_pattern,
    is_mtp,
    layer_pattern,
    pattern_matches,
)

METHODS = ("lora", "full")
BASE_PRECISIONS = ("bf16", "fp8")
ACT_BYTES = 2  # bf16 activations, as ``frugallm train`` runs on a GPU
ADAPTABLE = ("linear", "experts")


# ----- the module tree --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Module:
    """One module that holds parameters. ``shape``: [out, in] for a linear, router, embedding or head (the
    weight's shape); (E, I_m, H) for routed experts (gate_up_proj [E, 2 I_m, H], down_proj [E, H, I_m]);
    (width,) for a norm. ``block``: the decoder block index (MTP module d is num_hidden_layers + d), None
    outside blocks. ``part``: ``params.Matrix.part``'s grouping (plus ``norm``). ``tied``: an output head
    that is the embedding, no parameters of its own."""

    name: str
    kind: str  # linear, experts, router, norm, embedding, head
    shape: tuple[int, ...]
    part: str
    block: int | None = None
    tied: bool = False

    @property
    def numel(self) -> int:
        if self.tied:
            return 0
        if self.kind == "experts":
            E, Im, H = self.shape
            return E * 3 * Im * H
        return math.prod(self.shape)

    @property
    def mtp(self) -> bool:
        return is_mtp(self.name)

    def weight_bytes(self, precision: str, block_size: int = FP8_BLOCK) -> int:
        """Bytes stored at ``precision``: bf16, or fp8 where the published checkpoint has it (module doc)."""
        if precision == "bf16" or self.part not in FP8_PARTS:
            return 2 * self.numel
        return self.numel + self.scale_bytes(block_size)

    def scale_bytes(self, block_size: int = FP8_BLOCK) -> int:
        """fp32 block scales of an fp8 matrix, one per block x block tile, partial tiles included; experts
        per expert and per gate, up and down, as the checkpoint stores them."""
        def tiles(rows: int, cols: int) -> int:
            return math.ceil(rows / block_size) * math.ceil(cols / block_size)

        if self.part not in FP8_PARTS:
            return 0
        if self.kind == "experts":
            E, Im, H = self.shape
            return 4 * E * (2 * tiles(Im, H) + tiles(H, Im))
        return 4 * tiles(*self.shape)

    def lora_params(self, rank: int) -> int:
        """r (in + out) for a linear; E (r (H + 2 I_m) + r (I_m + H)) for the routed experts."""
        if self.kind == "linear":
            out, inp = self.shape
            return rank * (inp + out)
        if self.kind == "experts":
            E, Im, H = self.shape
            return E * (rank * (H + 2 * Im) + rank * (Im + H))
        raise ConfigError(f"{self.name} ({self.kind}) cannot take a LoRA adapter")


def _block_modules(cfg: ModelConfig, prefix: str, block: int) -> list[Module]:
    """One decoder block's modules, in the order the model registers them (``DecoderLayer``)."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    out: list[Module] = []

    def add(name: str, kind: str, shape: tuple[int, ...], part: str) -> None:
        out.append(Module(f"{prefix}.{name}", kind, shape, part, block))

    add("input_layernorm", "norm", (H,), "norm")
    a = "self_attn"
    if cfg.attention == "mla":
        if cfg.q_lora_rank is None:
            add(f"{a}.q_proj", "linear", (nh * cfg.qk_head_dim, H), "attention")
        else:
            add(f"{a}.q_a_proj", "linear", (cfg.q_lora_rank, H), "attention")
            add(f"{a}.q_a_layernorm", "norm", (cfg.q_lora_rank,), "norm")
            add(f"{a}.q_b_proj", "linear", (nh * cfg.qk_head_dim, cfg.q_lora_rank), "attention")
        add(f"{a}.kv_a_proj_with_mqa", "linear", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, H), "attention")
        add(f"{a}.kv_a_layernorm", "norm", (cfg.kv_lora_rank,), "norm")
        add(f"{a}.kv_b_proj", "linear", (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
            "attention")
    else:
        nkv = cfg.kv_heads
        add(f"{a}.q_proj", "linear", (nh * cfg.qk_head_dim, H), "attention")
        add(f"{a}.k_proj", "linear", (nkv * cfg.qk_head_dim, H), "attention")
        add(f"{a}.v_proj", "linear", (nkv * cfg.v_head_dim, H), "attention")
    add(f"{a}.o_proj", "linear", (H, nh * cfg.v_head_dim), "attention")
    add("post_attention_layernorm", "norm", (H,), "norm")
    if cfg.is_moe_layer(block):
        Im = cfg.moe_intermediate_size
        add("mlp.gate", "router", (cfg.n_routed_experts, H), "router")
        add("mlp.experts", "experts", (cfg.n_routed_experts, Im, H), "routed_expert")
        if cfg.n_shared_experts:
            Is = cfg.n_shared_experts * Im
            for proj, shape in (("gate_proj", (Is, H)), ("up_proj", (Is, H)), ("down_proj", (H, Is))):
                add(f"mlp.shared_experts.{proj}", "linear", shape, "shared_expert")
    else:
        I = cfg.intermediate_size
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            add(f"mlp.{proj}", "linear", shape, "dense_ffn")
    return out


def model_modules(cfg: ModelConfig) -> list[Module]:
    """Every module of ``DeepseekV3LM(cfg)`` that holds parameters, named and ordered as ``named_modules()``
    (module docstring). ``sum(m.numel) == param_counts(cfg).total_with_mtp``."""
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    mods = [Module("model.embed_tokens", "embedding", (V, H), "embedding")]
    for i in range(L):
        mods += _block_modules(cfg, f"model.layers.{i}", i)
    mods.append(Module("model.norm", "norm", (H,), "norm"))
    for d in range(cfg.num_nextn_predict_layers):
        p = f"model.mtp.{d}"
        mods += _block_modules(cfg, p, L + d)  # MTPModule is a DecoderLayer: its block registers first
        mods += [Module(f"{p}.enorm", "norm", (H,), "norm", L + d),
                 Module(f"{p}.hnorm", "norm", (H,), "norm", L + d),
                 Module(f"{p}.eh_proj", "linear", (H, 2 * H), "mtp_proj", L + d),
                 Module(f"{p}.shared_head.norm", "norm", (H,), "norm", L + d)]
    mods.append(Module("lm_head", "head", (V, H), "head", tied=cfg.tie_word_embeddings))
    return mods


def adaptable_names(cfg: ModelConfig) -> list[str]:
    """The distinct module names (layer indices as N) that can take an adapter: for messages."""
    seen: dict[str, None] = {}
    for m in model_modules(cfg):
        if m.kind in ADAPTABLE and m.name not in NEVER_TARGETED:
            seen.setdefault(layer_pattern(m.name), None)
    return list(seen)


# ----- LoRA targets and parameters ------------------------------------------------------------------------
def _check_rank(rank: object) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"lora rank must be an integer >= 1, got {rank!r}")
    return rank


def _targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    out = (targets,) if isinstance(targets, str) else tuple(targets)
    if not out:
        raise ConfigError("lora targets must be a non-empty list of name patterns")
    for t in out:
        why = invalid_pattern(t)
        if why:
            raise ConfigError(f"lora targets: {why}")
    return out


def lora_target_modules(cfg: ModelConfig, targets: Iterable[str] | str = DEFAULT_TARGETS, *,
                        mtp: bool = False) -> list[Module]:
    """The modules ``targets`` select, in model order, by ``frugallm.tune.targets``'s rules: the default set
    skips its patterns that name nothing here; any other pattern that selects no linear or routed experts
    is a ``ConfigError`` listing the modules that can take an adapter; the output head can never be one;
    MTP modules only with ``mtp``."""
    pats = _targets(targets)
    lenient = pats == DEFAULT_TARGETS
    mods = model_modules(cfg)
    chosen: set[str] = set()
    for pattern in pats:
        hits = [m for m in mods if pattern_matches(pattern, m.name)]
        never = [m for m in hits if m.name in NEVER_TARGETED]
        if never:
            raise ConfigError(f"lora targets: {pattern!r} matches {never[0].name}, which cannot take an adapter "
                              f"(the loss reads its weight directly)")
        ok = [m for m in hits if m.kind in ADAPTABLE]
        if not mtp:
            trunk = [m for m in ok if not m.mtp]
            if ok and not trunk and not lenient:
                raise ConfigError(f"lora targets: {pattern!r} matches only MTP modules ({ok[0].name}, ...); "
                                  f"adapt them with lora mtp (--lora-mtp)")
            ok = trunk
        if not ok:
            if lenient:
                continue
            what = (f"matches only {hits[0].name} ({hits[0].kind}), not a linear layer or routed experts"
                    if hits else "matches no module")
            raise ConfigError(f"lora targets: {pattern!r} {what}; the modules that can take an adapter are: "
                              f"{', '.join(adaptable_names(cfg))}")
        chosen.update(m.name for m in ok)
    if not chosen:
        raise ConfigError(f"lora targets {list(pats)} select no module; the modules that can take an adapter "
                          f"are: {', '.join(adaptable_names(cfg))}")
    return [m for m in mods if m.name in chosen]


def lora_parameter_count(cfg: ModelConfig, rank: int, targets: Iterable[str] | str = DEFAULT_TARGETS, *,
                         mtp: bool = False) -> int:
    """Trainable LoRA parameters of ``rank`` on the modules ``targets`` select (module docstring)."""
    _check_rank(rank)
    return sum(m.lora_params(rank) for m in lora_target_modules(cfg, targets, mtp=mtp))


def lora_parameters_by_part(cfg: ModelConfig, rank: int, targets: Iterable[str] | str = DEFAULT_TARGETS, *,
                            mtp: bool = False) -> dict[str, int]:
    """``lora_parameter_count`` split by ``Module.part`` (attention, dense_ffn, shared_expert, ...)."""
    _check_rank(rank)
    out: dict[str, int] = {}
    for m in lora_target_modules(cfg, targets, mtp=mtp):
        out[m.part] = out.get(m.part, 0) + m.lora_params(rank)
    return out


def _adapter_elements_per_token(mods: Sequence[Module], cfg: ModelConfig, rank: int) -> dict[int, int]:
    """Per block, the adapters' intermediates x A^T kept per token: r per adapted linear, 2 r per routed
    pair (gate_up and down) for the k pairs a token makes."""
    per: dict[int, int] = {}
    for m in mods:
        n = rank * (2 * cfg.num_experts_per_tok if m.kind == "experts" else 1)
        per[-1 if m.block is None else m.block] = per.get(-1 if m.block is None else m.block, 0) + n
    return per


def _adapter_forward_flops(mods: Sequence[Module], cfg: ModelConfig, rank: int) -> int:
    """Forward FLOPs per token of the adapters: 2 r (in + out) per adapted linear, k times per routed
    expert adapter pair (each token reaches k experts)."""
    total = 0
    for m in mods:
        per = 2 * m.lora_params(rank)
        total += per * cfg.num_experts_per_tok // cfg.n_routed_experts if m.kind == "experts" else per
    return total


# ----- memory -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneMemory:
    """Bytes per GPU of one fine-tuning run on ``gpus`` GPUs (module docstring)."""

    method: str
    base_precision: str
    gpus: int
    trainable_params: int
    weights_e4m3: int  # fp8 base: 1 byte per element of the block linears and experts
    weights_scales: int  # fp8 base: fp32 per 128 x 128 block
    weights_bf16: int  # the rest of an fp8 base, or all of a bf16 one (full: the bf16 working copy)
    gathered_layer: int  # FSDP: one block's weights while it runs
    trainable_master: int  # LoRA: the adapters (their own master); full: the fp32 master weights
    grads: int
    optimizer: int  # AdamW's two moments
    activations: int
    step_buffers: int

    @property
    def weights(self) -> int:
        return self.weights_e4m3 + self.weights_scales + self.weights_bf16

    @property
    def total(self) -> int:
        return (self.weights + self.gathered_layer + self.trainable_master + self.grads + self.optimizer
                + self.activations + self.step_buffers)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": self.weights, "total": self.total}


@dataclass(frozen=True)
class _Parts:
    """A run's bytes before sharding: ``sharded`` divided over G, ``fixed`` per GPU, and per block the
    (non-expert, routed-expert) stored bytes for the gathered layer."""

    method: str
    base_precision: str
    trainable_params: int
    sharded: dict[str, int]
    fixed: dict[str, int]
    blocks: list[tuple[int, int]]
    casts: tuple[int, int] = (0, 0)  # LoRA: bf16 casts of the (non-expert, routed-expert) adapters

    def at(self, gpus: int) -> FinetuneMemory:
        shard = {k: -(-v // gpus) for k, v in self.sharded.items()}
        gathered = 0 if gpus == 1 else max(ne + -(-e // gpus) for ne, e in self.blocks)
        fixed = dict(self.fixed)
        fixed["step_buffers"] += self.casts[0] + -(-self.casts[1] // gpus)
        return FinetuneMemory(method=self.method, base_precision=self.base_precision, gpus=gpus,
                              trainable_params=self.trainable_params, gathered_layer=gathered,
                              **shard, **fixed)

    @property
    def floor(self) -> int:
        """What no number of GPUs shards away: the fixed bytes, the casts of the non-expert adapters and
        the largest block's non-expert weights, gathered."""
        return sum(self.fixed.values()) + self.casts[0] + max((ne for ne, _ in self.blocks), default=0)


def _check_choice(flag: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _check_positive_int(flag: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _parts(cfg: ModelConfig, *, method: str, base_precision: str, lora_rank: int,
           targets: Iterable[str] | str, lora_mtp: bool, seq_len: int, micro_batch: int,
           activation_checkpointing: bool, adam_moments: str, adapter_dtype: str) -> _Parts:
    _check_choice("method", method, METHODS)
    _check_choice("base_precision", base_precision, BASE_PRECISIONS)
    _check_choice("adam_moments", adam_moments, ("fp32", "bf16"))
    _check_choice("adapter_dtype", dtype_name(adapter_dtype), ("fp32", "bf16"))
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("micro_batch", micro_batch)
    if method == "full" and base_precision == "fp8":
        raise ConfigError("full fine-tuning over an fp8 base is not supported: the update needs a "
                          "high-precision master; dequantize to bf16 (--base-precision bf16) or use --method lora")
    mods = model_modules(cfg)
    blocks: dict[int, list[int]] = {}
    for m in mods:
        if m.block is not None:
            ne_e = blocks.setdefault(m.block, [0, 0])
            ne_e[m.kind == "experts"] += m.weight_bytes(base_precision)
    tokens = micro_batch * seq_len
    if method == "full":  # training_memory's accounting, unsharded (sharded in ``_Parts.at``)
        tm = training_memory(cfg, tokens, seq_len=seq_len, precision="bf16", moments=adam_moments,
                             recompute=activation_checkpointing)
        n = param_counts(cfg).total_with_mtp
        return _Parts(method, base_precision, n,
                      sharded={"weights_e4m3": 0, "weights_scales": 0, "weights_bf16": tm.weights,
                               "trainable_master": tm.master_weights, "grads": tm.grads,
                               "optimizer": tm.optimizer},
                      fixed={"activations": tm.activations, "step_buffers": tm.step_buffers},
                      blocks=[(a, b) for a, b in blocks.values()])
    rank = _check_rank(lora_rank)
    chosen = lora_target_modules(cfg, targets, mtp=lora_mtp)
    acts = tokens * activation_bytes_per_token(cfg, seq_len, dtype="bf16", recompute=activation_checkpointing,
                                               micro_batch=micro_batch)
    p = sum(m.lora_params(rank) for m in chosen)
    a_bytes = dtype_bytes(adapter_dtype)
    p_experts = sum(m.lora_params(rank) for m in chosen if m.kind == "experts")
    casts = (0, 0) if a_bytes == ACT_BYTES else (ACT_BYTES * (p - p_experts), ACT_BYTES * p_experts)
    per_block = _adapter_elements_per_token(chosen, cfg, rank)
    adapter_acts = (max(per_block.values()) if activation_checkpointing else sum(per_block.values()))
    e4m3 = sum(m.numel for m in mods if m.part in FP8_PARTS) if base_precision == "fp8" else 0
    scales = sum(m.scale_bytes() for m in mods) if base_precision == "fp8" else 0
    bf16 = sum(m.weight_bytes(base_precision) for m in mods) - e4m3 - scales
    return _Parts(method, base_precision, p,
                  sharded={"weights_e4m3": e4m3, "weights_scales": scales, "weights_bf16": bf16,
                           "trainable_master": a_bytes * p, "grads": a_bytes * p,
                           "optimizer": 2 * dtype_bytes(adam_moments) * p},
                  fixed={"activations": acts + tokens * ACT_BYTES * adapter_acts, "step_buffers": 0},
                  blocks=[(a, b) for a, b in blocks.values()], casts=casts)


def finetune_memory(cfg: ModelConfig, *, method: str, base_precision: str = "bf16", lora_rank: int = 16,
                    targets: Iterable[str] | str = DEFAULT_TARGETS, lora_mtp: bool = False, seq_len: int = 4096,
                    micro_batch: int = 1, activation_checkpointing: bool = False, adam_moments: str = "fp32",
                    adapter_dtype: str = "fp32", gpus: int = 1) -> FinetuneMemory:
    """Bytes per GPU of fine-tuning ``cfg`` with ``method`` (lora or full) over a ``base_precision`` (bf16 or
    fp8) base, ``micro_batch`` sequences of ``seq_len`` per GPU, the states sharded over ``gpus``
    (module docstring). The LoRA arguments apply to ``method="lora"``."""
    _check_positive_int("gpus", gpus)
    return _parts(cfg, method=method, base_precision=base_precision, lora_rank=lora_rank, targets=targets,
                  lora_mtp=lora_mtp, seq_len=seq_len, micro_batch=micro_batch,
                  activation_checkpointing=activation_checkpointing, adam_moments=adam_moments,
                  adapter_dtype=adapter_dtype).at(gpus)


@dataclass(frozen=True)
class FinetuneGpus:
    """The fewest GPUs of ``memory_bytes`` each that hold a run: ``min_gpus`` by the bytes alone, ``gpus``
    the smallest count from there that splits the routed experts evenly (G divides E, or E divides G), and
    the memory per GPU at ``gpus``. ``None`` counts: no number of GPUs holds it, because what is not
    sharded (activations, step buffers) and the gathered layer alone exceed one GPU."""

    min_gpus: int | None
    gpus: int | None
    memory: FinetuneMemory | None


def _expert_even(cfg: ModelConfig, gpus: int) -> int:
    if cfg.ffn != "moe":
        return gpus
    E = cfg.n_routed_experts
    g = gpus
    while E % g and g % E:
        g += 1
    return g


def gpus_needed(cfg: ModelConfig, memory_bytes: float, **run: Any) -> FinetuneGpus:
    """The GPUs a run (``finetune_memory``'s keyword arguments but ``gpus``) needs at ``memory_bytes`` per
    GPU. The bytes per GPU fall as G grows, toward what is not sharded plus the gathered layer's non-expert
    weights (the floor), so the least G is found by starting at the sharded bytes over the room the floor
    leaves and stepping up."""
    if not memory_bytes > 0:
        raise ConfigError(f"GPU memory must be positive, got {memory_bytes!r}")
    parts = _parts(cfg, **{"base_precision": "bf16", "lora_rank": 16, "targets": DEFAULT_TARGETS,
                           "lora_mtp": False, "seq_len": 4096, "micro_batch": 1,
                           "activation_checkpointing": False, "adam_moments": "fp32", "adapter_dtype": "fp32",
                           **run})
    sharded = sum(parts.sharded.values()) + parts.casts[1]
    floor = parts.floor
    if parts.at(1).total <= memory_bytes:
        g = 1
    elif floor >= memory_bytes:
        return FinetuneGpus(None, None, None)
    else:  # at(g) >= (sharded + expert casts) / g + floor: no fewer than that over memory - floor hold it
        g = max(2, math.ceil(sharded / (memory_bytes - floor)))
        while parts.at(g).total > memory_bytes:
            g += 1
    even = _expert_even(cfg, g)
    return FinetuneGpus(g, even, parts.at(even))


# ----- FLOPs, time and dollars ----------------------------------------------------------------------------------
def finetune_flops_per_token(cfg: ModelConfig, seq_len: int, *, method: str, lora_rank: int = 16,
                             targets: Iterable[str] | str = DEFAULT_TARGETS, lora_mtp: bool = False) -> float:
    """FLOPs per trained token: full = ``train_flops_per_token`` (3 F); LoRA = 2 F + 3 F_adapters (module
    docstring). F includes the MTP modules, as ``forward_train`` runs them."""
    _check_choice("method", method, METHODS)
    if method == "full":
        return train_flops_per_token(cfg, seq_len)
    rank = _check_rank(lora_rank)
    chosen = lora_target_modules(cfg, targets, mtp=lora_mtp)
    return 2 * forward_flops_per_token(cfg, seq_len, include_mtp=True) + 3 * _adapter_forward_flops(chosen, cfg,
                                                                                                   rank)


def reference_mfu(hardware_file: str | None = None) -> tuple[float, str]:
    """The MFU (of the bf16 peak) DeepSeek-V3's pre-training achieved by our FLOP count, from
    ``cluster.toml``'s GPU-hours per trillion tokens, and a line saying so."""
    cl = load_cluster("deepseek-v3")
    achieved = achieved_flops_from_gpu_hours(preset("deepseek-v3"), cl["seq_len"],
                                             cl["gpu_hours_per_trillion_tokens"])
    device = get_device(cl["gpu"], hardware_file)
    mfu = achieved / device.peak_flops("bf16")
    return mfu, (f"assumed: DeepSeek-V3 pre-training's {cl['gpu_hours_per_trillion_tokens']:,.0f} {cl['gpu']} "
                 f"GPU-hours per 1e12 tokens ({cl['source'].split(':')[0]}, {cl['date']})")


def _positive(flag: str, value: float | None, upper: float | None = None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value <= 0 or (upper is not None and value > upper):
        bound = f" and at most {upper:g}" if upper is not None else ""
        raise ConfigError(f"{flag} must be a positive number{bound}, got {value:g}")


def finetune_run(cfg: ModelConfig, device: Device, *, method: str, base_precision: str, gpus: int | None,
                 tokens: float | None, mfu: float, price: float | None, seq_len: int, lora_rank: int,
                 targets: Iterable[str] | str, lora_mtp: bool, **memory: Any) -> dict[str, Any]:
    """One method's record: memory per GPU (at ``gpus``, else at the fewest that hold it), the GPUs it needs,
    FLOPs per token, and with ``tokens`` GPU-hours and dollars."""
    run = {"method": method, "base_precision": base_precision, "seq_len": seq_len, "lora_rank": lora_rank,
           "targets": targets, "lora_mtp": lora_mtp, **memory}
    need = gpus_needed(cfg, device.memory_gb * 1e9, **run)
    if gpus is not None:
        mem = finetune_memory(cfg, gpus=gpus, **run)
    else:
        mem = need.memory
    flops = finetune_flops_per_token(cfg, seq_len, method=method, lora_rank=lora_rank, targets=targets,
                                     lora_mtp=lora_mtp)
    rec: dict[str, Any] = {
        "method": method, "base_precision": base_precision,
        "lora_rank": lora_rank if method == "lora" else None,
        "trainable_params": finetune_memory(cfg, **run).trainable_params,
        "memory": None if mem is None else mem.as_dict(),
        "memory_whole_model": finetune_memory(cfg, gpus=1, **run).as_dict(),  # nothing sharded
        "fits": None if mem is None else mem.total <= device.memory_gb * 1e9,
        "min_gpus": need.min_gpus, "gpus_needed": need.gpus,
        "flops_per_token": flops, "gpu_hours": None, "cost_usd": None,
    }
    if tokens is not None:
        hours = tokens * flops / (mfu * device.peak_flops("bf16")) / 3600
        rec["gpu_hours"] = hours
        rec["cost_usd"] = None if price is None else hours * price
    return rec


def finetune_estimate(cfg: ModelConfig, *, model: str, gpu: str, methods: Sequence[tuple[str, str]],
                      lora_rank: int = 16, targets: Iterable[str] | str = DEFAULT_TARGETS, lora_mtp: bool = False,
                      seq_len: int = 4096, micro_batch: int = 1, activation_checkpointing: bool = False,
                      adam_moments: str = "fp32", gpus: int | None = None, tokens: float | None = None,
                      mfu: float | None = None, price: float | None = None,
                      hardware_file: str | None = None) -> dict[str, Any]:
    """The record ``frugallm cost finetune`` prints: one ``finetune_run`` per (method, base precision) of
    ``methods`` on ``gpu``, with the model's parameter count and the MFU and price assumed."""
    _check_rank(lora_rank)
    targets = _targets(targets)
    _positive("--tokens", tokens)
    _positive("--mfu", mfu, upper=1.0)
    _positive("--price", price)
    if gpus is not None:
        _check_positive_int("--gpus", gpus)
    device = get_device(gpu, hardware_file)
    mfu_source = "given"
    if mfu is None:
        mfu, mfu_source = reference_mfu(hardware_file)
    if price is None:
        price = device.price_per_hour
    runs = [finetune_run(cfg, device, method=m, base_precision=bp, gpus=gpus, tokens=tokens, mfu=mfu, price=price,
                         seq_len=seq_len, lora_rank=lora_rank, targets=targets, lora_mtp=lora_mtp,
                         micro_batch=micro_batch, activation_checkpointing=activation_checkpointing,
                         adam_moments=adam_moments)
            for m, bp in methods]
    return {"model": model, "gpu": device.key, "gpu_name": device.name, "gpu_memory_gb": device.memory_gb,
            "params_total_with_mtp": param_counts(cfg).total_with_mtp, "seq_len": seq_len,
            "micro_batch": micro_batch, "activation_checkpointing": activation_checkpointing,
            "adam_moments": adam_moments, "lora_rank": lora_rank, "targets": list(targets), "lora_mtp": lora_mtp,
            "tokens": tokens, "mfu": mfu, "mfu_source": mfu_source, "peak_tflops": device.peak_flops("bf16") / 1e12,
            "price_per_gpu_hour": price, "gpus": gpus, "runs": runs}


COMPARE = (("lora", "fp8"), ("lora", "bf16"), ("full", "bf16"))

__all__ = ["BASE_PRECISIONS", "COMPARE", "METHODS", "FinetuneGpus", "FinetuneMemory", "Module", "adaptable_names",
           "finetune_estimate", "finetune_flops_per_token", "finetune_memory", "finetune_run", "gpus_needed",
           "lora_parameter_count", "lora_parameters_by_part", "lora_target_modules", "model_modules",
           "reference_mfu"]
