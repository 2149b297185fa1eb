"""The accelerator catalogue (``hardware.toml``, each entry with its source and date), user overrides, and the
CPU's peak FLOP/s measured once by a matmul probe and cached.

A user file has the catalogue's shape; its entries are merged field by field over the built-in ones, so
``[h100-sxm] price_per_hour = 2.2`` changes only the price and ``[my-gpu] ...`` adds a device. It is given
as ``hardware_file`` (the CLI's ``--hardware-file``) or the environment variable ``FRUGALLM_HARDWARE_FILE``.

The CPU has no datasheet figure worth using, and its peak depends on the dtype (AVX512-BF16 runs bf16
matmuls several times faster than fp32), so ``cpu_peak_flops(dtype)`` times square matmuls for well under
3 s and caches the best rate in ``$FRUGALLM_CACHE_DIR/cpu_peak.json`` (default ``~/.cache/frugallm``),
keyed by CPU model, thread count, torch version, dtype and (fp32) the GEMM backend: change any of them
and it measures again.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugallm import fsio
from frugallm.cost.catalog import merged_entries
from frugallm.errors import ConfigError

HARDWARE_ENV = "FRUGALLM_HARDWARE_FILE"
CACHE_ENV = "FRUGALLM_CACHE_DIR"


@dataclass(frozen=True, kw_only=True)
class Device:
    key: str
    name: str
    bf16_tflops: float
    memory_gb: float
    bandwidth_tbs: float
    fp8_tflops: float | None = None
    price_per_hour: float | None = None
    aliases: tuple[str, ...] = ()
    spec_source: str = ""
    spec_date: str = ""
    price_source: str = ""
    price_date: str = ""

    def __post_init__(self) -> None:
        for name in ("bf16_tflops", "memory_gb", "bandwidth_tbs", "fp8_tflops", "price_per_hour"):
            v = getattr(self, name)
            if v is None and name in ("fp8_tflops", "price_per_hour"):
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"hardware entry [{self.key}]: {name} must be a positive number, got {v!r}")

    def peak_flops(self, precision: str = "bf16") -> float:
        """Dense peak FLOP/s at ``precision`` (bf16 or fp8)."""
        if precision == "bf16":
            return self.bf16_tflops * 1e12
        if precision == "fp8":
            if self.fp8_tflops is None:
                raise ConfigError(f"{self.name} has no fp8 peak in the hardware catalogue; use --precision bf16")
            return self.fp8_tflops * 1e12
        raise ConfigError(f"precision must be bf16 or fp8, got {precision!r}")


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def load_catalog(hardware_file: str | Path | None = None) -> dict[str, Device]:
    """The built-in catalogue merged with ``hardware_file`` (or ``$FRUGALLM_HARDWARE_FILE``)."""
    table = merged_entries("hardware.toml", hardware_file, HARDWARE_ENV, what="hardware", record=Device,
                           required=("name", "bf16_tflops", "memory_gb", "bandwidth_tbs"), normalise=_normalise)
    return {key: Device(key=key, **{**entry, "aliases": tuple(_normalise(a) for a in entry.get("aliases", ()))})
            for key, entry in table.items()}


def get_device(name: str, hardware_file: str | Path | None = None) -> Device:
    """A device by key, alias or display name, case-insensitive ('H800', 'h100', 'NVIDIA H100 SXM' ...)."""
    catalog = load_catalog(hardware_file)
    want = _normalise(name)
    for key, dev in catalog.items():
        if want == key or want in dev.aliases or want == _normalise(dev.name):
            return dev
    raise ConfigError(f"unknown GPU {name!r}; known: {', '.join(sorted(catalog))} "
                      f"(add your own with --hardware-file or ${HARDWARE_ENV})")


# ----- the CPU's peak, measured -------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "frugallm")


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


def _probe(dtype: Any, budget_s: float) -> float:
    """Best FLOP/s of square matmuls on the GEMM the model's training layers call (``frugallm.model.gemm``:
    oneDNN or MKL for float32 on the CPU) within about ``budget_s`` seconds. Sizes grow from 256 while the
    next one is predicted to fit the budget, so a slow dtype (bf16 without AVX512-BF16 runs at a few
    GFLOP/s) cannot overrun it. The best, not the mean: a peak is what the hardware does when nothing else
    interferes."""
    import torch

    from frugallm.model.gemm import nt

    best, n = 0.0, 256
    deadline = time.perf_counter() + budget_s
    x = torch.randn(n, n).to(dtype)
    spin = time.perf_counter() + budget_s / 10
    while time.perf_counter() < spin:  # wake the thread pool and the BLAS up before timing anything
        nt(x, x, training=True)
    while n <= 4096:
        x, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        nt(x, w, training=True)  # warm-up: the first call pays for packing and thread start-up
        size_deadline = min(deadline, time.perf_counter() + budget_s / 3)
        dt = float("inf")
        for _ in range(50):
            t0 = time.perf_counter()
            nt(x, w, training=True)
            dt = time.perf_counter() - t0
            best = max(best, 2 * n**3 / dt)
            if time.perf_counter() + dt > size_deadline:
                break
        if time.perf_counter() + 2 * 8 * dt > deadline:  # the next size costs 8x, warm-up included
            break
        n *= 2
    return best


def cpu_peak_flops(dtype: Any = "fp32", *, refresh: bool = False, budget_s: float = 1.0) -> float:
    """Peak matmul FLOP/s of this CPU in ``dtype`` ('fp32', 'bf16', or a torch dtype), measured once and
    cached (module docstring). ``refresh`` measures again."""
    import torch

    from frugallm.cost.memory import dtype_name

    name = dtype_name(dtype)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
    if torch_dtype is None:
        raise ConfigError(f"the CPU probe supports fp32, bf16 and fp16, got {dtype!r}")
    from frugallm.model.gemm import cpu_gemm

    gemm = f"gemm={cpu_gemm()} | " if name == "fp32" else ""  # bf16 runs on oneDNN whatever the choice
    key = f"{cpu_model()} | threads={torch.get_num_threads()} | torch={torch.__version__} | {gemm}{name}"
    path = cache_dir() / "cpu_peak.json"
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}  # a damaged cache is only a lost measurement
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("flops", 0) > 0:
        return float(cache[key]["flops"])
    flops = _probe(torch_dtype, budget_s)
    cache[key] = {"flops": flops, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        fsio.write_json(path, cache, sort_keys=True)
    except OSError:
        pass  # a read-only home still gets the figure, just not cached
    return flops


__all__ = ["CACHE_ENV", "HARDWARE_ENV", "Device", "cache_dir", "cpu_model", "cpu_peak_flops", "get_device",
           "load_catalog"]
