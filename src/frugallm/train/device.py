"""Where a run computes and in what: the device, the precision ``auto`` resolves to, and the memory the
device has free and has used at its peak."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from frugallm.errors import DeviceError
from frugallm.kernels.host import cpu_has_native_bf16


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device computes it faster than fp32, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    fast = cpu_has_native_bf16()
    if fast is None:  # no feature flags to read: compare the cached matmul probes
        from frugallm.kernels.probe import cpu_peak_flops

        fast = cpu_peak_flops("bf16") > 1.3 * cpu_peak_flops("fp32")
    return "bf16" if fast else "fp32"


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return UNKNOWN_MEMORY


UNKNOWN_MEMORY = 1 << 62  # what ``available_memory`` says when it cannot tell: never refuse a run


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The measured peak to set against the estimate: on a GPU the allocator's peak of live tensors (what the
    estimate models); on a CPU the process's peak resident set, which adds Python, the libraries and the
    data loader, so it sits above the estimate."""
    if device.type == "cuda":
        return {"memory_peak_bytes": int(torch.cuda.max_memory_allocated(device)),
                "memory_peak_source": "torch.cuda.max_memory_allocated"}
    import resource
    import sys

    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return {"memory_peak_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * unit,
            "memory_peak_source": "process peak resident set (ru_maxrss)"}
