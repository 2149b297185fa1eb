"""lm-evaluation-harness against the server: its ``local-completions`` model (echo + logprobs scoring, greedy
generation over HTTP) gives what its ``hf`` model (transformers on the same weights) gives."""

from __future__ import annotations

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from frugallm.config import ModelConfig  # noqa: E402
from frugallm.model import build_model  # noqa: E402
from frugallm.model.hf import save_pretrained  # noqa: E402
from frugallm.serve.engine import Engine, EngineConfig  # noqa: E402
from frugallm.serve.loading import load_for_serving  # noqa: E402
from lm_eval_tasks import evaluate, write_tasks  # noqa: E402
from test_serve_server import TINY, LiveServer, make_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face directory both sides load: weights, tokenizer.json and a tokenizer_config.json that
    AutoTokenizer understands."""
    root = tmp_path_factory.mktemp("lmeval")
    tok = make_tokenizer(root / "tok")
    cfg = root / "tok" / "tokenizer_config.json"
    cfg.write_text('{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", '
                   '"model_max_length": 128}')
    save_pretrained(build_model(ModelConfig(**TINY), seed=3), root / "model",
                    extra_files={"tokenizer.json": tok, "tokenizer_config.json": cfg})
    return root / "model"


def _responses(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_local_completions_equals_its_hf_model(hf_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = write_tasks(tmp_path / "tasks", n_mc=4, n_gen=2, n_choices=3)
    model, codec = load_for_serving(hf_dir)
    srv = LiveServer(Engine(model, codec, EngineConfig(block_size=8, cache_memory=4 << 20)), name="tiny")
    try:
        ours = evaluate("local-completions", f"model=tiny,base_url={srv.url}/v1/completions,tokenizer={hf_dir},"
                        "tokenized_requests=True,max_length=128", ["tiny_mc", "tiny_gen"], tasks)
        stats = srv.engine.stats()
    finally:
        srv.close()
    theirs = evaluate("hf", f"pretrained={hf_dir},dtype=float32", ["tiny_mc", "tiny_gen"], tasks)
    mc_ours, mc_theirs = _responses(ours, "tiny_mc"), _responses(theirs, "tiny_mc")
    assert len(mc_ours) == len(mc_theirs) == 4
    deltas = [abs(a[0][0] - b[0][0]) for da, db in zip(mc_ours, mc_theirs, strict=True)
              for a, b in zip(da, db, strict=True)]
    assert len(deltas) == 12 and max(deltas) < 2e-3, max(deltas)
    greedy = [(a[0][1], b[0][1]) for da, db in zip(mc_ours, mc_theirs, strict=True) for a, b in zip(da, db, strict=True)]
    assert all(x == y for x, y in greedy)
    gen = _responses(ours, "tiny_gen")
    assert gen == _responses(theirs, "tiny_gen") and any(r[0] for r in gen)  # not all empty
    # the choices of one question share its context: all but the first come from the prefix cache
    assert stats["cache_hit_rate"] > 0.3, stats["cache_hit_rate"]
    print(f"max |delta loglik| {max(deltas):.2e}; prefix-cache hit rate {stats['cache_hit_rate']:.1%}")
