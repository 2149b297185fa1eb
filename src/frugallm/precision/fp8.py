"""FP8 (e4m3) with fine-grained scaling, as in DeepSeek-V3 (section 3.3): 1x128 tiles for activations,
128x128 blocks for weights."""

from __future__ import annotations

import torch

BLOCK = 128


def dequantize_weight_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [out, in] in float8, scale_inv [ceil(out/block), ceil(in/block)]: w * scale per block, as the
    published checkpoint stores its FP8 weights (``weight_scale_inv``)."""
    out_f, in_f = w.shape
    expected = (-(-out_f // block), -(-in_f // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
                         f"in {block}x{block} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (w.float() * scale).to(dtype)
