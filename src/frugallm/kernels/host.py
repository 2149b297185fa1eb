"""What this machine's CPU is, read once: /proc/cpuinfo (model, vendor, feature flags) and what PyTorch
reports (vector capability, oneDNN). The kernel policy's choices (``frugallm.kernels.policy.choose``) and
the CPU peak probe's cache key start from these facts. Only ``cpu_facts`` imports torch."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path


def cpuinfo_field(*names: str) -> str | None:
    """The value of the first /proc/cpuinfo line whose key starts with one of ``names`` ('model name',
    'vendor_id', 'flags' on x86, 'Features' on Arm), or None where the file or the key is not there."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(names):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown-cpu"


def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ..., or '' where /proc/cpuinfo does not say (other systems, Arm)."""
    return cpuinfo_field("vendor_id") or ""


def cpu_has_native_bf16() -> bool | None:
    """True where the CPU has bf16 matmul instructions (x86 AVX512-BF16 or AMX, Arm BF16), False where it
    has none (bf16 is then emulated, about 10x slower than fp32 on an AVX2 EPYC, measured here), None if
    /proc/cpuinfo is not there to tell."""
    flags = cpuinfo_field("flags", "Features")
    return None if flags is None else bool(set(flags.split()) & {"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class CpuFacts:
    vendor: str  # '' when unknown
    capability: str  # torch.backends.cpu.get_cpu_capability(): 'AVX512', 'AVX2', 'DEFAULT', ...
    onednn: bool  # PyTorch has oneDNN's float32 inner product (torch.ops.mkldnn._linear_pointwise)


@functools.cache
def cpu_facts() -> CpuFacts:
    """This host's facts, probed once per process (they do not change while it runs)."""
    import torch

    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    return CpuFacts(cpu_vendor(), torch.backends.cpu.get_cpu_capability(), onednn)
