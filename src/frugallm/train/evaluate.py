"""Validation loss, perplexity and bits per byte, next to what ``lzma`` (xz, preset 9) achieves on the same text.

Bits per byte makes models with different tokenizers comparable: bpb = loss_nats_per_token / ln 2 *
tokens / bytes, where tokens / bytes is measured on the validation split as packed. The lzma reference
compresses the same validation text (decoded from its tokens, which the byte-level tokenizer reproduces
exactly) and divides the compressed bits by the bytes.
"""

from __future__ import annotations

import lzma
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from frugallm.data.loader import iter_eval_batches
from frugallm.data.pack import PreparedCorpus


@torch.no_grad()
def evaluate(model: torch.nn.Module, corpus: PreparedCorpus, *, seq_len: int, batch: int = 16,
             max_windows: int | None = None, split: str = "val", device: torch.device | str = "cpu",
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Mean next-token loss over validation windows of ``seq_len + 1`` tokens (all of them unless
    ``max_windows``), with perplexity and bits per byte."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dev = torch.device(device)
    ctx = (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext())
    try:
        for tokens in iter_eval_batches(corpus, split, batch=batch, window=seq_len + 1, max_windows=max_windows):
            tokens = tokens.to(dev)
            with ctx:
                logits = model(tokens[:, :-1])  # [B, S, V]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += tokens[:, 1:].numel()
    finally:
        model.train(was_training)
    if count == 0:
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "val_bpb": float("nan"), "val_tokens": 0}
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": loss / math.log(2) / corpus.bytes_per_token_val, "val_tokens": count}


def lzma_bpb(corpus: PreparedCorpus, split: str = "val") -> float:
    """Bits per byte of xz (preset 9) on the split's text."""
    from frugallm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(corpus.tokenizer_path)
    ids = corpus.tokens(split)
    text = tok.decode([int(i) for i in ids], skip_special_tokens=True)
    raw = text.encode("utf-8")
    if not raw:
        return float("nan")
    return len(lzma.compress(raw, preset=9)) * 8 / len(raw)
