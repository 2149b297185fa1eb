"""The model's linear layer, ``frugallm.model.layers.Linear``, under the name precision/fp8.py imports; its
GEMM library is the kernel policy's (``frugallm.kernels.gemm``)."""

from frugallm.model.layers import Linear

__all__ = ["Linear"]
