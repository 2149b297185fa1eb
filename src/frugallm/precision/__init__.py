"""Numerics: the FP8 fine-grained recipe and its backends (start with ``fp8.py``, which teaches the recipe)."""

from frugallm.precision.backends import (
    BACKENDS,
    EmulatedBackend,
    Fp8Backend,
    HopperBackend,
    hopper_unavailable_reason,
    select_backend,
)
from frugallm.precision.fp8 import (
    convert_to_fp8,
    fp8_module_names,
    update_recipes,
)
from frugallm.precision.fp8_linear import Fp8GroupedExperts, Fp8Linear
from frugallm.precision.frozen import (
    FrozenFp8Experts,
    FrozenFp8Linear,
    RequantizationError,
    frozen_fp8_modules,
    requantization_error,
    requantize_blocks,
)
from frugallm.precision.quant import Fp8Tensor, dequantize, quantize, quantize_blocks, quantize_tiles
from frugallm.precision.recipe import Fp8Recipe

__all__ = [
    "BACKENDS", "EmulatedBackend", "Fp8Backend", "HopperBackend", "hopper_unavailable_reason",
    "select_backend", "Fp8Recipe", "convert_to_fp8", "fp8_module_names",
    "update_recipes", "Fp8GroupedExperts", "Fp8Linear", "Fp8Tensor", "dequantize", "quantize", "quantize_blocks",
    "quantize_tiles", "FrozenFp8Experts", "FrozenFp8Linear", "RequantizationError", "frozen_fp8_modules",
    "requantization_error", "requantize_blocks",
]
