"""Throughput, achieved FLOP/s, MFU and money, measured as the run goes.

FLOPs per trained token come from the cost model (``frugallm.cost.flops.train_flops_per_token``, exact
matmul shapes, MTP included). The peak is the hardware catalogue's for a GPU, and the CPU's measured
once by a matmul probe (``frugallm.kernels.probe``) in the dtype the run computes in (bf16 under autocast,
else fp32) on the GEMM library of the run's kernel policy.
"""

from __future__ import annotations

from typing import Any

import torch

from frugallm.config import ModelConfig
from frugallm.cost.flops import train_flops_per_token
from frugallm.errors import ConfigError
from frugallm.kernels import KernelPolicy
from frugallm.train.config import TrainConfig


def device_peak_and_price(device: torch.device, precision: str, compute: str,
                          kernels: KernelPolicy | None = None) -> tuple[str, float | None, float | None]:
    """(device kind, peak FLOP/s per device in the run's compute dtype or None if unknown, $ per hour).
    ``compute`` is the dtype the run computes in outside FP8 GEMMs (fp32 or bf16): on devices without fp8
    (the CPU) the fp8 GEMMs count at its peak, measured on ``kernels``' GEMM library."""
    from frugallm.cost import hardware
    from frugallm.kernels import probe

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)  # e.g. "NVIDIA H100 80GB HBM3"
        for word in name.replace("-", " ").split():
            try:
                spec = hardware.get_device(word)
            except ConfigError:
                continue
            key = "fp8" if precision == "fp8" and spec.fp8_tflops else "bf16"
            return spec.name, spec.peak_flops(key), spec.price_per_hour
        return name, None, None  # a GPU the catalogue lacks: no MFU, no default price
    # a CPU has no list price per hour: money is counted only at a --price-per-hour the user gives
    return "cpu", probe.cpu_peak_flops(compute, kernels=kernels), None


class RateMeter:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, world_size: int = 1,
                 compute: str | None = None, kernels: KernelPolicy | None = None,
                 flops_per_token: float | None = None):
        """``flops_per_token``: what one trained token costs when it is not pretraining's (fine-tuning)."""
        self.cfg = cfg
        self.compute = compute or ("fp32" if cfg.precision == "fp32" else "bf16")
        self.world_size = world_size
        self.model_cfg = model_cfg
        self.flops_per_token = flops_per_token or train_flops_per_token(model_cfg, cfg.seq_len)
        self.kernels = kernels
        self.kind, self.peak, default_price = device_peak_and_price(device, cfg.precision, self.compute, kernels)
        self._peak_checked = False
        self.price = cfg.price_per_hour if cfg.price_per_hour is not None else default_price
        self._window: list[tuple[int, float]] = []  # recent (tokens, seconds) for a smoothed rate

    def update(self, tokens: int, seconds: float) -> None:
        self._window.append((tokens, seconds))
        del self._window[:-20]

    def snapshot(self, elapsed_s: float) -> dict[str, Any]:
        tok = sum(t for t, _ in self._window)
        sec = sum(s for _, s in self._window) or 1e-9
        tps = tok / sec
        achieved = tps * self.flops_per_token / self.world_size
        if self.peak and achieved > self.peak:
            self._recheck_peak()
            if self.peak and achieved > self.peak:
                self.peak = None
        out: dict[str, Any] = {"tokens_per_s": round(tps, 1), "tflops": round(achieved / 1e12, 4)}
        out["mfu"] = round(achieved / self.peak, 5) if self.peak else None
        out["cost_usd"] = (round(elapsed_s / 3600 * self.price * self.world_size, 6)
                           if self.price is not None else None)
        return out

    def _recheck_peak(self) -> None:
        """A run faster than the peak proves the peak wrong. On a CPU that is a cached probe taken while the
        machine was busy: measure again (once; the run pauses about a second) and keep the better figure.
        If the run still beats it, the MFU is left out rather than reported above 100%."""
        if self.kind == "cpu" and not self._peak_checked:
            from frugallm.kernels import probe

            self._peak_checked = True
            self.peak = max(self.peak or 0.0, probe.cpu_peak_flops(self.compute, kernels=self.kernels,
                                                                   refresh=True))

    def cost_record(self, tokens: int, elapsed_s: float) -> dict[str, Any]:
        from frugallm.cost.report import run_cost

        return run_cost(cfg=self.model_cfg, seq_len=self.cfg.seq_len, tokens=tokens, wall_seconds=elapsed_s,
                        device_kind=self.kind, device_count=self.world_size,
                        price_per_device_hour=self.price, peak_flops_per_device=self.peak)
