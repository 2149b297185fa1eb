"""The training run's own configuration (the model's lives in ``frugallm.config.ModelConfig``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from frugallm.config import reject_unknown_fields
from frugallm.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp8")
MOMENT_DTYPES = ("fp32", "bf16")
# a bf16 moment times beta rounds back to itself when 1 - beta is under half its relative step, 2^-8 at
# worst, and then never decays (frugallm.train.optim)
BF16_MAX_BETA = 1 - 2**-8


@dataclass(kw_only=True)
class TrainConfig:
    # data
    data: list[str] | None = None  # None: the embedded corpus (the running Python's standard library)
    text_field: str = "text"
    tokenizer: str | None = None  # an existing tokenizer.json instead of training one
    val_fraction: float = 0.01
    # batch
    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step (global, whatever the world size)
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    # optimizer: AdamW; weight decay applies to matrices (linears, stacked experts, router) only,
    # not to the embedding, norms or the balancing bias
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    decay_fraction: float = 0.3  # warmup-stable-decay: the last 30% of the horizon decays linearly
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adam_moments: str = "fp32"  # fp32 | bf16: the dtype AdamW keeps its two moments in (8 or 4 bytes/param)
    # DeepSeek-V3 objectives and balancing
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    bias_gamma: float = 1e-3
    # weight of the classic batch-wise auxiliary balance loss (frugallm.model.moe: DeepSeek-V2's expert-level
    # loss, Switch Transformer's for k = 1, whose alpha is 1e-2); 0: off, as in V3, which balances by the bias
    aux_loss_alpha: float = 0.0
    # numerics and memory
    # auto | fp32 | bf16 | fp8 (bf16 autocast around FP8 GEMMs). auto: bf16 on GPUs, and on CPUs whose
    # measured bf16 matmul rate beats fp32 (AVX512-BF16/AMX); fp32 on CPUs that only emulate bf16 (AVX2)
    precision: str = "auto"
    fp8_backend: str = "auto"
    # keep each FP8 linear's input for the backward as e4m3 tiles (1 + 4/128 bytes per element) instead of
    # at the activation dtype, as DeepSeek-V3 caches Linear inputs (section 3.3.3); precision fp8 only
    fp8_saved_activations: bool = False
    activation_checkpointing: bool = False
    # parallel layout over the processes torchrun starts (frugallm.train.distributed): world = dp x ep;
    # every rank reads its own share of the batch, routed experts are split over ep ranks
    ep: int = 1  # expert-parallel ranks
    dp: int | None = None  # None: world_size / ep
    # horizon: the first limit reached ends the run; the schedule follows max_steps when given, else
    # max_tokens, else the time budget
    time_budget_s: float | None = 600.0
    max_steps: int | None = None
    max_tokens: int | None = None
    # bookkeeping
    log_every: int = 10
    eval_every_s: float = 120.0
    eval_windows: int = 32  # validation windows for periodic evaluation (the final one reads the whole split)
    checkpoint_every_s: float = 300.0
    keep_checkpoints: int = 3
    seed: int = 0
    price_per_hour: float | None = None  # device price; default: the hardware catalogue's
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # CPU threads (default: all cores)

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be > 0, got {v!r}")

        for name in ("seq_len", "batch_size", "grad_accum", "lr", "log_every", "eval_windows",
                     "keep_checkpoints", "eval_every_s", "checkpoint_every_s"):
            positive(name)
        for name in ("time_budget_s", "max_steps", "max_tokens", "price_per_hour", "threads", "dp"):
            positive(name, allow_none=True)
        if not isinstance(self.ep, int) or isinstance(self.ep, bool) or self.ep < 1:
            raise ConfigError(f"ep must be a positive integer, got {self.ep!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {v!r}")
        if self.adam_moments not in MOMENT_DTYPES:
            raise ConfigError(f"adam_moments must be one of {', '.join(MOMENT_DTYPES)}, got {self.adam_moments!r}")
        if self.adam_moments == "bf16":
            for name in ("beta1", "beta2"):
                if getattr(self, name) >= BF16_MAX_BETA:
                    raise ConfigError(
                        f"adam_moments = 'bf16' needs {name} below {BF16_MAX_BETA:.5f}, got {getattr(self, name)}: "
                        f"a bf16 moment times {name} rounds back to itself and would never decay "
                        f"(DeepSeek-V3 uses 0.9 and 0.95); use adam_moments = 'fp32'")
        if not isinstance(self.fp8_saved_activations, bool):
            raise ConfigError(f"fp8_saved_activations must be true or false, got {self.fp8_saved_activations!r}")
        if self.fp8_saved_activations and self.precision != "fp8":
            raise ConfigError(f"fp8_saved_activations needs precision = 'fp8', got precision = {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("decay_fraction and min_lr_ratio must be in [0, 1]")
        for name in ("mtp_lambda", "balance_alpha", "bias_gamma", "aux_loss_alpha", "weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.time_budget_s is None and self.max_steps is None and self.max_tokens is None:
            raise ConfigError("set at least one of time_budget_s, max_steps, max_tokens")
        if isinstance(self.data, str):
            self.data = [self.data]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        reject_unknown_fields(cls, d, "train config")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"invalid train config: {e}") from None

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
