"""FP8 training with DeepSeek-V3's fine-grained recipe (V3 report, arXiv 2412.19437, section 3.3).

Why: an e4m3 number is one byte and Hopper's FP8 tensor cores do twice the bf16 FLOP/s (1,979 against 989
TFLOP/s dense on an H100). The catch is range and precision: e4m3 has 3 mantissa bits (a relative step of
2^-3) and spans 2^-9 .. 448. With one scale per tensor, a single outlier sets the scale and pushes every
small value of the tensor into the subnormals or to zero.

The recipe, and where each piece lives:
1. Fine-grained scales (``quant.py``). Activations and activation gradients get one scale per 1x128 tile
   along the contraction dim K; weights one per 128x128 block. An outlier now costs precision only in
   its own tile or block. Scales are computed online from the current tensor, scale = amax / 448
   (optionally rounded up to a power of two), rather than from an amax history as in delayed scaling.
2. All three GEMMs of a linear in FP8 (``fp8_linear.py``): the forward y = x W^T, the input gradient
   dx = dy W and the weight gradient dW = dy^T x, each operand quantized along the dim its GEMM sums
   over, so that per-tile scales factor out of the partial sums. Products are accumulated in FP32
   (Hopper's tensor cores keep about 14 bits, so DeepSeek copies partial sums to FP32 every 128 K).
3. What stays in high precision: master weights, gradients and optimizer states (FP32); the embedding,
   the output head, the MoE router, every normalisation, the attention core (QK^T, softmax, PV) and the
   elementwise SwiGLU. ``convert_to_fp8`` converts exactly the GEMMs outside that list: attention
   projections, dense FFNs, shared experts and (through the grouped path) the routed experts, and the MTP
   projection ``eh_proj``.
4. Backends (``backends.py``): ``emulated`` (the numerics reference, anywhere) and ``hopper`` (real FP8
   GEMMs, compute capability 9.0), chosen by ``Fp8Recipe.backend`` ('auto' picks the fastest that works).

Use it on a model built in FP32 and run the forward under bf16 autocast, so that what is not converted
runs in bf16 as in the V3 setup:

    model = convert_to_fp8(build_model(cfg), Fp8Recipe())
    with torch.autocast("cuda", torch.bfloat16):
        out = model.forward_train(tokens)

Without autocast the rest runs in FP32, which is what ``frugallm train --precision fp8`` does on CPUs that
only emulate bf16 (``frugallm.train.loop.resolve_precision``): the FP8 GEMM operands are rounded the same
way either way.

Conversion swaps modules in place and keeps parameter names, so a state_dict (and a checkpoint) is the
same before and after. ``frugallm.model.hf.dequantize_weight_blocks`` reads the published FP8 checkpoint's
weights.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from torch import nn

from frugallm.errors import ConfigError
from frugallm.model.gemm import Linear
from frugallm.model.moe import GroupedExperts
from frugallm.precision.backends import BACKENDS, require_hopper
from frugallm.precision.fp8_linear import Fp8GroupedExperts, Fp8Linear

log = logging.getLogger("frugallm.precision")

KEEP_HIGH_PRECISION = ("lm_head",)  # linears matched by name that stay unconverted (the output head)


@dataclass(kw_only=True, frozen=True)
class Fp8Recipe:
    tile: int = 128  # activation / gradient tile length along K (1 x tile)
    block: int = 128  # weight block side (block x block)
    pow2_scales: bool = False  # round scales up to powers of two: scaling becomes exact in binary
    backend: str = "auto"  # 'auto' | 'emulated' | 'hopper'
    fp8_saved_activations: bool = False  # keep linear inputs for backward in e4m3 (1 + 4/tile bytes/element)
    # keep each weight's e4m3 blocks from the forward for the input gradient (1 byte per weight, the whole
    # model's until the backward) rather than quantizing the weight again there, which gives the same blocks;
    # sharded runs turn it off (frugallm.train.distributed), where the copies would be whole, not sharded
    cache_weights: bool = True

    def __post_init__(self) -> None:
        for name in ("tile", "block"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 16 == 0):
                raise ConfigError(f"fp8 {name} must be a positive multiple of 16 (128 in the V3 recipe), "
                                  f"got {v!r}")
        for name in ("pow2_scales", "fp8_saved_activations", "cache_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"fp8 {name} must be true or false, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"fp8 backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "hopper" and (self.tile, self.block) != (128, 128):
            raise ConfigError(f"fp8 backend 'hopper' needs tile = block = 128 (cuBLAS blockwise FP8), "
                              f"got tile={self.tile}, block={self.block}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fp8Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown fp8 field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        saved = "e4m3" if self.fp8_saved_activations else "as-is"
        return (f"backend={self.backend} tiles=1x{self.tile} blocks={self.block}x{self.block} "
                f"pow2={self.pow2_scales} saved-inputs={saved} weight-copies={self.cache_weights}")


def convert_to_fp8(model: nn.Module, recipe: Fp8Recipe | None = None, *, backend: str | None = None,
                   keep: Iterable[str] = KEEP_HIGH_PRECISION) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` for an ``Fp8Linear`` and every ``GroupedExperts`` for an
    ``Fp8GroupedExperts`` (same parameters, same names), except modules whose dotted name matches one of
    the fnmatch patterns in ``keep``. The embedding, router (``Router`` is not an ``nn.Linear``), norms and
    the attention core are not GEMM modules and stay as they are. Converting again updates the recipe.
    ``backend``, when given, overrides ``recipe.backend`` (the run config's ``fp8_backend``).
    Raises ``DeviceError`` when the backend is 'hopper' and no capable GPU is present."""
    recipe = recipe or Fp8Recipe()
    if backend is not None:
        recipe = replace(recipe, backend=backend)
    if recipe.backend == "hopper":
        require_hopper()
    patterns = tuple(keep)
    converted = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            if isinstance(child, (Fp8Linear, Fp8GroupedExperts)):
                child.recipe = recipe
            elif type(child) in (nn.Linear, Linear):  # exact types: subclasses may mean what we do not know
                setattr(parent, child_name, Fp8Linear.from_linear(child, recipe))
                converted += 1
            elif type(child) is GroupedExperts:
                setattr(parent, child_name, Fp8GroupedExperts.from_experts(child, recipe))
                converted += 1
    log.info("fp8: converted %d modules (%s); kept in high precision: %s", converted, recipe.describe(),
             ", ".join(patterns) or "nothing by name")
    return model


def update_recipes(model: nn.Module, **changes: Any) -> int:
    """Change fields of the recipe of every converted module (e.g. ``cache_weights=False`` once the model
    is sharded); returns how many modules changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, (Fp8Linear, Fp8GroupedExperts)):
            m.recipe = replace(m.recipe, **changes)
            n += 1
    return n


def fp8_module_names(model: nn.Module) -> list[str]:
    """Dotted names of the converted modules, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8GroupedExperts))]
