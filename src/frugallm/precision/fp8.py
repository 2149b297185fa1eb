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
   ``Fp8Recipe`` (``recipe.py``) holds every knob of the recipe.

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
from dataclasses import replace
from typing import Any

from torch import nn

from frugallm.model.layers import Linear
from frugallm.model.moe import GroupedExperts
from frugallm.precision.backends import require_hopper
from frugallm.precision.fp8_linear import Fp8GroupedExperts, Fp8Linear
from frugallm.precision.recipe import Fp8Recipe

log = logging.getLogger("frugallm.precision")

KEEP_HIGH_PRECISION = ("lm_head",)  # linears matched by name that stay unconverted (the output head)


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
