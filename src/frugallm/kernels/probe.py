"""The CPU's peak matmul FLOP/s, measured once by a timed probe and cached on disk.

The CPU has no datasheet figure worth using, and its peak depends on the dtype (AVX512-BF16 runs bf16
matmuls several times faster than fp32) and on the float32 GEMM library the kernel policy chooses, so
``cpu_peak_flops(dtype)`` times square matmuls on that library for well under 3 s and caches the best
rate in ``$FRUGALLM_CACHE_DIR/cpu_peak.json`` (default ``~/.cache/frugallm``), keyed by CPU model, thread
count, torch version, dtype and (fp32) the GEMM library: change any of them and it measures again. MFU
(``frugallm.train.rate``) and ``precision = "auto"`` on a CPU without feature flags read it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from frugallm import fsio
from frugallm.errors import ConfigError
from frugallm.kernels import gemm
from frugallm.kernels.host import cpu_model
from frugallm.kernels.policy import KernelPolicy, choose

CACHE_ENV = "FRUGALLM_CACHE_DIR"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "frugallm")


def _probe(dtype: torch.dtype, kernels: KernelPolicy, budget_s: float) -> float:
    """Best FLOP/s of square matmuls on the GEMM the model's training layers call (``kernels.gemm``) within
    about ``budget_s`` seconds. Sizes grow from 256 while the next one is predicted to fit the budget, so a
    slow dtype (bf16 without AVX512-BF16 runs at a few GFLOP/s) cannot overrun it. The best, not the mean:
    a peak is what the hardware does when nothing else interferes."""
    best, n = 0.0, 256
    deadline = time.perf_counter() + budget_s
    x = torch.randn(n, n).to(dtype)
    spin = time.perf_counter() + budget_s / 10
    while time.perf_counter() < spin:  # wake the thread pool and the BLAS up before timing anything
        gemm.nt(x, x, kernels, training=True)
    while n <= 4096:
        x, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        gemm.nt(x, w, kernels, training=True)  # warm-up: the first call pays for packing and thread start-up
        size_deadline = min(deadline, time.perf_counter() + budget_s / 3)
        dt = float("inf")
        for _ in range(50):
            t0 = time.perf_counter()
            gemm.nt(x, w, kernels, training=True)
            dt = time.perf_counter() - t0
            best = max(best, 2 * n**3 / dt)
            if time.perf_counter() + dt > size_deadline:
                break
        if time.perf_counter() + 2 * 8 * dt > deadline:  # the next size costs 8x, warm-up included
            break
        n *= 2
    return best


def cpu_peak_flops(dtype: Any = "fp32", *, kernels: KernelPolicy | None = None, refresh: bool = False,
                   budget_s: float = 1.0) -> float:
    """Peak matmul FLOP/s of this CPU in ``dtype`` ('fp32', 'bf16', 'fp16' or a torch dtype) on the GEMM
    library of ``kernels`` (default: the one chosen for the CPU), measured once and cached (module doc).
    ``refresh`` measures again."""
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).lower())
    if torch_dtype not in _NAMES:
        raise ConfigError(f"the CPU probe supports fp32, bf16 and fp16, got {dtype!r}")
    name = _NAMES[torch_dtype]
    kernels = kernels or choose("cpu", name)
    lib = f"gemm={kernels.gemm} | " if name == "fp32" else ""  # bf16 runs on oneDNN whatever the choice
    key = f"{cpu_model()} | threads={torch.get_num_threads()} | torch={torch.__version__} | {lib}{name}"
    path = cache_dir() / "cpu_peak.json"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}  # a damaged cache is only a lost measurement
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("flops", 0) > 0:
        return float(cache[key]["flops"])
    flops = _probe(torch_dtype, kernels, budget_s)
    cache[key] = {"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        fsio.write_json(path, cache, sort_keys=True)
    except OSError:
        pass  # a read-only home still gets the figure, just not cached
    return flops
