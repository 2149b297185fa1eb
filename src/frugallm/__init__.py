"""frugallm: train, fine-tune and serve DeepSeek-V3-style models, and know what each run cost."""

__version__ = "0.1.0"


def from_pretrained(path, device="cpu", dtype=None, fp8="dequantize"):  # type: ignore[no-untyped-def]
    """Load a Hugging Face DeepSeek-V3 / V2 directory; see ``frugallm.model.hf.from_pretrained``."""
    import torch

    from frugallm.model.hf import from_pretrained as _load

    return _load(path, device=device, dtype=dtype or torch.float32, fp8=fp8)


def save_pretrained(model, path, **kwargs):  # type: ignore[no-untyped-def]
    """Write a Hugging Face DeepSeek directory transformers loads; see ``frugallm.model.hf.save_pretrained``."""
    from frugallm.model.hf import save_pretrained as _save

    return _save(model, path, **kwargs)
