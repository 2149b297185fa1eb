"""The memory check a run makes before it reads any data: the cost model's estimate for this model,
batch, precision and kernel policy (``frugallm.cost.memory.training_memory``) against what the device has
free, so that a run that cannot fit fails in a second."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugallm.config import ModelConfig
from frugallm.cost.memory import format_bytes, require_fits, training_memory
from frugallm.kernels import KernelPolicy
from frugallm.train.config import TrainConfig
from frugallm.train.device import UNKNOWN_MEMORY, available_memory


@dataclass(frozen=True)
class MemoryCheck:
    estimate: dict[str, int]  # TrainingMemory.as_dict(), bytes per device
    available: int  # bytes free on the device when the run started

    def summary(self, cfg: TrainConfig) -> str:
        """One line: the estimate per device by part, with the switches that shrink it."""
        m = self.estimate
        parts = [f"weights {format_bytes(m['weights'])}", f"grads {format_bytes(m['grads'])}",
                 f"AdamW moments ({cfg.adam_moments}) {format_bytes(m['optimizer'])}",
                 f"activations{' (fp8 linear inputs)' if cfg.fp8_saved_activations else ''} "
                 f"{format_bytes(m['activations'])}"]
        if m["step_buffers"]:
            parts.append(f"per-step buffers {format_bytes(m['step_buffers'])}")
        avail = "" if self.available >= UNKNOWN_MEMORY else f" of {format_bytes(self.available)} available"
        return f"memory estimate: {format_bytes(m['total'])} per device{avail} ({', '.join(parts)})"


def check_memory(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, *, outer_precision: str,
                 kernels: KernelPolicy, world_size: int = 1) -> MemoryCheck:
    """The estimate for one device of a run computing in ``outer_precision`` (fp32 or bf16, FP8 GEMMs
    inside when ``cfg.precision`` is fp8) on ``kernels``; raises ``ResourceError`` when it does not fit."""
    micro = cfg.batch_size // cfg.grad_accum // world_size
    # under bf16 autocast the fp32 parameters are the master copy and the bf16 casts the working weights
    mem = training_memory(model_cfg, micro * cfg.seq_len, seq_len=cfg.seq_len, precision=outer_precision,
                          moments=cfg.adam_moments, fp8_gemms=cfg.precision == "fp8",
                          fp8_saved_activations=cfg.fp8_saved_activations,
                          recompute=cfg.activation_checkpointing, kernels=kernels, shards=world_size)
    available = available_memory(device)
    require_fits(mem, available, where=f"this {device.type} device")
    return MemoryCheck(mem.as_dict(), available)
