"""The kernel policy: which implementation runs each of the few operations whose fastest kernel depends on
the platform, chosen once from the device and the precision by whoever builds the model (train, serve,
tune), passed to the model, and asked by the memory model what its kernels keep for the backward.

    attention            the causal self-attention of a training step (equal query and key lengths)
      sdpa               ``F.scaled_dot_product_attention``; on a GPU its flash or memory-efficient kernel
      pad-v              SDPA with v zero-padded to the query/key head dim where d_v < d_qk: the CPU's flash
                         kernel wants one head dim for q, k and v, without it SDPA takes the math path, which
                         materialises the full [S, T] scores (fwd+bwd of a tiny-shaped layer 49 ms padded
                         against 63-74 ms on the math path). The padding's FLOPs are real work but not model
                         FLOPs: MFU counts the model's.
      blocked            float32 training: batched GEMMs over two query blocks (``kernels.attention``) while
                         the probabilities they keep fit ``blocked_max_bytes``, else pad-v. At the tiny preset's
                         shape (16 x 4 heads x 256, d_qk 48, d_v 32) fwd+bwd on 2 threads took 16-18 ms
                         against 22-26 ms for the flash kernel with v padded, and the training step was
                         1.3-4.8% faster. bf16 keeps pad-v: upcast to float32, this path made its step no
                         faster. Inference and long sequences keep the flash kernel, which saves nothing.
    gemm                 the library of the float32 training GEMMs whose shapes are fixed for a run (the
                         ``Linear`` layers and the output head; ``kernels.gemm`` has the measurements)
      torch              PyTorch's own: MKL's sgemm on the CPU, cuBLAS on a GPU
      onednn             oneDNN for the forward and input-gradient GEMMs, MKL for the weight gradient. Chosen
                         where PyTorch reports AVX-512 on a CPU that is not Intel's, where MKL runs a generic
                         kernel (an AMD EPYC Zen 4: 1.16x faster forward, 1.26x input gradient)
    expert_row_buckets   the routed experts' rows padded to a few bucket sizes (``bucket_rows``) where their
                         GEMMs run on oneDNN, which builds a kernel for every new row count: bf16 and fp16 on
                         the CPU (an [m, 256] x [256, 384] bf16 GEMM: 1.43 ms at a new m, 0.12 ms at one seen
                         before, on an AMX Xeon)
    grouped_mm           the routed experts as one ``torch._grouped_mm`` (bf16 on CUDA) instead of one matmul
                         per expert; not on the CPU, where its backward fails (torch 2.13) and its forward is
                         no faster
    vocab_block          the output head's logits GEMM over blocks of this many vocabulary rows into one
                         buffer the chunks share (CPU: one [512, 256] x [256, 8192] GEMM into a fresh tensor
                         ran at 74 GFLOP/s, 2,048-row blocks into the shared buffer at 106, the tiny step 10%
                         faster); None: one GEMM

Every kernel still checks that it applies to the tensors it is given (the dtype it is for, grad mode, the
device) and otherwise runs PyTorch's default, so a model built for fp32 and run under bf16 autocast takes
the bf16 paths its policy allows. Choose for the precision the model runs in.

One override, read by the entry points only (``frugallm train``, ``frugallm info --kernels``, the
benchmarks): ``FRUGALLM_KERNELS="gemm=torch,attention=sdpa,expert_row_buckets=off,vocab_block=none"``,
``key=value`` pairs over the choice for the device. This module imports no torch at import time, so that
``frugallm.cost`` can use its formulas.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any

from frugallm.errors import ConfigError, DeviceError

KERNELS_ENV = "FRUGALLM_KERNELS"
ATTENTION = ("sdpa", "pad-v", "blocked")
GEMMS = ("torch", "onednn")
CPU_VOCAB_BLOCK = 2048
BLOCKED_MAX_BYTES = 64 << 20


@dataclass(frozen=True, kw_only=True)
class KernelPolicy:
    """The kernels a model runs (module doc). The default is PyTorch's own everywhere."""

    attention: str = "sdpa"
    blocked_max_bytes: int = BLOCKED_MAX_BYTES
    gemm: str = "torch"
    expert_row_buckets: bool = False
    grouped_mm: bool = False
    vocab_block: int | None = None
    device: str = ""  # what it was chosen for, for display
    precision: str = ""
    reasons: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)  # (field, why)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ConfigError(f"kernels: attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.gemm not in GEMMS:
            raise ConfigError(f"kernels: gemm must be one of {', '.join(GEMMS)}, got {self.gemm!r}")
        for name in ("blocked_max_bytes", "vocab_block"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"kernels: {name} must be a positive integer, got {v!r}")

    # ----- what runs, asked by the kernels and by the memory model -----------------------------------
    def attention_path(self, batch: int, heads: int, seq: int, elem_bytes: int) -> str:
        """'blocked', 'pad-v' or 'sdpa': the kernel of a training step's causal self-attention of this shape
        with activations of ``elem_bytes`` (blocked needs float32 or float64, without autocast)."""
        if (self.attention == "blocked" and elem_bytes in (4, 8)
                and blocked_attention_bytes(batch, heads, seq, elem_bytes) <= self.blocked_max_bytes):
            return "blocked"
        return "pad-v" if self.attention in ("pad-v", "blocked") else "sdpa"

    def attention_saved_bytes(self, *, batch: int, heads: int, seq: int, d_qk: int, d_v: int,
                              elem_bytes: int) -> Fraction:
        """Bytes per token the attention kernel keeps for the backward. SDPA's flash kernel: q, k, v and its
        output, n_h (2 d_qk + 2 d_v) elements (v and the output n_h d_qk each when v is padded), and the fp32
        log-sum-exp, 4 n_h. Blocked: q, k, v unpadded and each query block's probabilities,
        [b - a, b] per head for block [a, b), about 3 S / 4 per token and head."""
        path = self.attention_path(batch, heads, seq, elem_bytes)
        if path == "blocked":
            return (heads * (2 * d_qk + d_v) * elem_bytes
                    + Fraction(blocked_attention_bytes(1, heads, seq, elem_bytes), seq))
        d_vk = max(d_v, d_qk) if path == "pad-v" else d_v
        return Fraction(heads * (2 * d_qk + 2 * d_vk) * elem_bytes + 4 * heads)

    def pads_expert_rows(self, elem_bytes: int) -> bool:
        """Whether routed experts computing in ``elem_bytes`` (2: bf16 or fp16) pad their rows."""
        return self.expert_row_buckets and elem_bytes == 2

    def expert_padding_bytes(self, *, hidden: int, intermediate: int, top_k: int, elem_bytes: int) -> Fraction:
        """Bytes per token the row padding adds: each expert's input and SwiGLU tensors, (H + 4 I_m) b per
        row, for up to 1/8 more rows (``bucket_rows``' bound from 64 rows per expert on), and an int64 row
        map per routed pair, 8 k."""
        if not self.pads_expert_rows(elem_bytes):
            return Fraction(0)
        return top_k * Fraction((hidden + 4 * intermediate) * elem_bytes, 8) + 8 * top_k

    # ----- display -------------------------------------------------------------------------------------
    def describe(self) -> list[tuple[str, str, str]]:
        """(field, value, why) for each choice."""
        why = dict(self.reasons)
        rows = []
        for f in fields(self):
            if f.name in ("device", "precision", "reasons"):
                continue
            v = getattr(self, f.name)
            shown = "on" if v is True else "off" if v is False else "none" if v is None else str(v)
            rows.append((f.name, shown, why.get(f.name, "")))
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "reasons"}


# ----- shapes the kernels and the memory model share ---------------------------------------------------
def query_blocks(seq: int) -> list[int]:
    """Bounds of the blocked attention's two query blocks: block [a, b) attends keys [0, b)."""
    return [0, seq // 2, seq] if seq >= 2 else [0, seq]


def blocked_attention_bytes(batch: int, heads: int, seq: int, elem_bytes: int = 4) -> int:
    """Bytes of the probabilities the blocked attention keeps for backward: [heads, b - a, b] per sequence
    and query block [a, b), about 3/8 of the full [S, S] score matrix."""
    bounds = query_blocks(seq)
    return elem_bytes * batch * heads * sum((b - a) * b for a, b in itertools.pairwise(bounds))


def bucket_rows(m: int) -> int:
    """m rounded up to a multiple of an eighth of the power of two at or below m, and of at least 8 rows: 8
    buckets per octave, at most 1/8 more rows from 64 rows on (about 1/16 on average), at most 7 below."""
    step = max(8, 1 << max(0, m.bit_length() - 4))
    return -(-m // step) * step


# ----- choosing ----------------------------------------------------------------------------------------
def auto_prefers_onednn(capability: str, vendor: str) -> bool:
    """The GEMM rule (module doc): AVX-512 on a CPU whose MKL kernels are not Intel's own."""
    return capability.startswith("AVX512") and vendor not in ("", "GenuineIntel")


def _gemm_reason(capability: str, vendor: str, onednn: bool) -> str:
    where = f"{capability} on {vendor or 'an unknown vendor'}: "
    if not onednn:
        return where + "this torch has no oneDNN"
    if not capability.startswith("AVX512"):
        return where + "oneDNN is no faster than MKL without AVX-512"
    if vendor == "GenuineIntel":
        return where + "MKL runs Intel's own AVX-512 kernels, the faster ones"
    if not vendor:
        return where + "PyTorch's default"
    return where + "MKL runs a generic kernel here, oneDNN its AVX-512 ones"


_PRECISIONS = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "fp64": "fp64", "float64": "fp64",
               "double": "fp64", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
               "half": "fp16", "fp8": "fp8"}


def _precision(precision: object) -> str:
    name = str(precision).removeprefix("torch.")
    if name not in _PRECISIONS:
        raise ConfigError(f"kernels: precision must be one of fp32, bf16, fp16, fp64, fp8 (or a torch dtype), "
                          f"got {precision!r}")
    return _PRECISIONS[name]


def _device_type(device: object) -> str:
    return str(getattr(device, "type", device)).split(":")[0]


def choose(device: object = "cpu", precision: object = "fp32", override: str | None = None) -> KernelPolicy:
    """The policy for a model on ``device`` ('cpu', 'cuda', a torch.device) computing in ``precision``
    ('fp32', 'bf16', 'fp8' (bf16 activations), a torch dtype), with ``override`` (``FRUGALLM_KERNELS``'s
    syntax) applied on top. The CPU is probed once per process (``frugallm.kernels.host``)."""
    kind, prec = _device_type(device), _precision(precision)
    act = "bf16" if prec == "fp8" else prec
    why: dict[str, str] = {}
    if kind == "cpu":
        from frugallm.kernels.host import cpu_facts

        facts = cpu_facts()
        wide = act in ("fp32", "fp64")
        attention = "blocked" if wide else "pad-v"
        why["attention"] = ("float32 training: two-block GEMMs while their probabilities fit, else pad-v"
                            if wide else "the CPU flash kernel wants one head dim; blocked is no faster in bf16")
        why["blocked_max_bytes"] = ("probabilities kept above this: the flash kernel, which keeps none" if wide
                                    else "unused without the blocked path")
        onednn = facts.onednn and auto_prefers_onednn(facts.capability, facts.vendor)
        gemm = "onednn" if onednn else "torch"
        why["gemm"] = _gemm_reason(facts.capability, facts.vendor, facts.onednn)
        buckets = act in ("bf16", "fp16")
        why["expert_row_buckets"] = ("oneDNN builds a kernel per row count" if buckets
                                     else f"{act} expert GEMMs run on MKL")
        why["grouped_mm"] = "its CPU backward fails and its forward is no faster"
        why["vocab_block"] = "logits GEMMs in blocks into one shared buffer"
        policy = KernelPolicy(attention=attention, gemm=gemm, expert_row_buckets=buckets, grouped_mm=False,
                              vocab_block=CPU_VOCAB_BLOCK, device=kind, precision=prec,
                              reasons=tuple(why.items()))
    elif kind == "cuda":
        import torch

        grouped = hasattr(torch, "_grouped_mm")
        why["attention"] = "SDPA picks its flash or memory-efficient kernel, which keep no probabilities"
        why["gemm"] = "cuBLAS"
        why["expert_row_buckets"] = "cuBLAS needs no kernel per row count"
        why["vocab_block"] = "one logits GEMM per chunk"
        why["grouped_mm"] = ("bf16 experts in one grouped GEMM" if grouped
                             else f"torch {torch.__version__} has no _grouped_mm")
        policy = KernelPolicy(grouped_mm=grouped, device=kind, precision=prec, reasons=tuple(why.items()))
    else:  # meta and other devices: PyTorch's own kernels
        policy = KernelPolicy(device=kind, precision=prec)
    return apply_override(policy, override) if override else policy


_ON_OFF = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def apply_override(policy: KernelPolicy, override: str) -> KernelPolicy:
    """``policy`` with the ``key=value`` pairs of ``override`` (comma-separated) replacing its choices."""
    changes: dict[str, Any] = {}
    keys = {f.name: f for f in fields(KernelPolicy) if f.name not in ("device", "precision", "reasons")}
    for item in filter(None, (p.strip() for p in override.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        key = key.replace("-", "_")
        if not sep or key not in keys:
            raise ConfigError(f"{KERNELS_ENV}: {item!r} is not key=value with a key among {', '.join(keys)}")
        value = value.lower()
        if key in ("expert_row_buckets", "grouped_mm"):
            if value not in _ON_OFF:
                raise ConfigError(f"{KERNELS_ENV}: {key} must be on or off, got {value!r}")
            changes[key] = _ON_OFF[value]
        elif key in ("vocab_block", "blocked_max_bytes"):
            if value == "none" and key == "vocab_block":
                changes[key] = None
            elif value.isdigit():
                changes[key] = int(value)
            else:
                raise ConfigError(f"{KERNELS_ENV}: {key} must be a positive integer"
                                  f"{' or none' if key == 'vocab_block' else ''}, got {value!r}")
        else:
            changes[key] = value
    try:
        new = replace(policy, **changes)
    except ConfigError as e:
        raise ConfigError(f"{KERNELS_ENV}={override!r}: {e}") from None
    if new.gemm == "onednn":
        from frugallm.kernels.host import cpu_facts

        if not cpu_facts().onednn:
            raise DeviceError(f"{KERNELS_ENV}: gemm=onednn asked for, but this torch was built without oneDNN "
                              "(mkldnn); use gemm=torch")
    why = dict(policy.reasons)
    why.update({k: f"{KERNELS_ENV} override" for k in changes})
    return replace(new, reasons=tuple(why.items()))


def override_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The override an entry point passes to ``choose``: ``$FRUGALLM_KERNELS``, None when unset or empty."""
    return (os.environ if environ is None else environ).get(KERNELS_ENV) or None
