"""What the lab measures through the serving engine (``frugallm.serve.engine``), on an arm's trained model:
decode tokens per second after a long prompt (mla-vs-mha), and MTP speculative decoding's acceptance and
speed-up against the same model decoding without drafts (mtp). Greedy, one stream, the prompt taken from the
held-out split's tokens so that the model sees text like its training data. Written to the arm's run
directory as ``serve.json`` and reused, so a restarted lab does not measure twice.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from frugallm import fsio

REPEATS = 3  # decodes of the prompt per engine; the median is the figure


def _decode_rate(engine: Any, prompt: list[int], new: int) -> float:
    from frugallm.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    engine.submit(prompt, params)
    got, started = 0, None
    while engine.has_work():
        for out in engine.step():
            got += len(out.token_ids)
        if started is None and got:
            started, first = time.perf_counter(), got  # the first token's (prefill) time excluded
    return (got - first) / (time.perf_counter() - started) if started and got > first else float("nan")


def measure(path: Path, prompt: list[int], *, new_tokens: int = 32, speculative: bool = False) -> dict[str, Any]:
    """Decode figures of the run at ``path``, cached in its ``serve.json``: the median of ``REPEATS`` decodes,
    with drafts and without alternately when ``speculative``. An arm two claims serve (the base serves
    mla-vs-mha plainly and mtp with drafts) is measured again, both ways, for the second."""
    from frugallm.rundir import load_model
    from frugallm.serve.engine import Engine, EngineConfig

    cache = path / "serve.json"
    fig: dict[str, Any] = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    model = None
    drafts_missing = speculative and fig.get("mtp", True) and "speculative_speedup" not in fig
    if "decode_tokens_per_s" not in fig or drafts_missing:
        model = load_model(path)[0].eval()
        fig.update(context=len(prompt), new_tokens=new_tokens, mtp=bool(len(model.model.mtp)))
        engines = {False: Engine(model, None, EngineConfig(speculative=False, max_batch=1, prefix_cache=False))}
        if speculative and len(model.model.mtp):
            engines[True] = Engine(model, None, EngineConfig(speculative=True, max_batch=1, prefix_cache=False))
        rates: dict[bool, list[float]] = {k: [] for k in engines}
        for e in engines.values():
            _decode_rate(e, prompt[:8], 4)  # warm-up
        for _ in range(REPEATS):  # alternating, so that both see the same machine
            for k, e in engines.items():
                rates[k].append(_decode_rate(e, prompt, new_tokens))
        fig["decode_tokens_per_s"] = statistics.median(rates[False])
        fig["cache_bytes_per_token"] = engines[False].cache_bytes_per_token
        if True in engines:
            fig["speculative_tokens_per_s"] = statistics.median(rates[True])
            fig["acceptance_rate"] = engines[True].stats()["acceptance_rate"]
            fig["speculative_speedup"] = fig["speculative_tokens_per_s"] / fig["decode_tokens_per_s"]
    if model is not None:
        fsio.write_text(cache, json.dumps(fig, indent=1))
    return fig


def held_out_prompt(path: Path, length: int) -> list[int]:
    """``length`` tokens of the validation split the run at ``path`` was evaluated on."""
    from frugallm.data.pack import prepare_corpus
    from frugallm.train.runconfig import read_run_config

    model_cfg, cfg = read_run_config(path / "config.toml")
    corpus = prepare_corpus(cfg.data, vocab_size=model_cfg.vocab_size, tokenizer_path=path / "tokenizer.json",
                            text_field=cfg.text_field, val_fraction=cfg.val_fraction, progress=False,
                            cache_dir=path.parent / ".cache" / "data")  # the training loop's
    ids = corpus.tokens("val")
    return [int(t) for t in ids[:length]]
