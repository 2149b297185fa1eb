"""A short sample from a run at the end of training (the serving engine does fast generation)."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def sample_text(run_dir: str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.8,
                top_p: float = 0.95, seed: int = 0) -> str:
    from frugallm.data.tokenizer import load_tokenizer
    from frugallm.rundir import load_model

    run_dir = Path(run_dir)
    tok = load_tokenizer(run_dir / "tokenizer.json")
    model = load_model(run_dir)[0].eval()
    ids = tok.encode(prompt).ids
    gen = torch.Generator().manual_seed(seed)
    limit = model.config.max_position_embeddings
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids[-limit:]]))[0, -1].float() / max(temperature, 1e-5)  # [V]
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        ids.append(int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)]))
    return tok.decode(ids)
