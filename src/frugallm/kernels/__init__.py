"""Platform choices in one place: which kernel runs attention, the CPU's float32 GEMMs, the routed experts
and the output head (``policy``, torch-free, which ``frugallm.cost`` reads too), the kernels themselves
(``attention``, ``gemm``, ``experts``: torch), the host's CPU facts (``host``) and its measured peak
(``probe``). Who builds a model chooses a ``KernelPolicy`` once (``choose``) and passes it in."""

from __future__ import annotations

from typing import Any

from frugallm.kernels.policy import KERNELS_ENV, KernelPolicy, apply_override, choose, override_from_env


def install(model: Any, kernels: KernelPolicy) -> None:
    """Give ``model`` and every submodule that runs a policy's kernel (those with a ``kernels`` attribute)
    this policy; ``model.kernels`` then says what the model runs."""
    for module in model.modules():
        if hasattr(module, "kernels"):
            module.kernels = kernels
    model.kernels = kernels


__all__ = ["KERNELS_ENV", "KernelPolicy", "apply_override", "choose", "install", "override_from_env"]
