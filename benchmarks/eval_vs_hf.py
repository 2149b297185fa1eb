"""An lm-evaluation-harness multiple-choice run through our server (its ``local-completions`` model: echo +
logprobs over HTTP, contexts shared by a question's choices served from the prefix cache) against its ``hf``
model (transformers' DeepseekV3ForCausalLM) on the same task and the same weights, in one process, on the CPU.
The times are of the harness's ``loglikelihood`` calls alone (HTTP round trips included on our side; task
building and model loading excluded on both).

    PYTHONPATH=src .venv/bin/python benchmarks/eval_vs_hf.py [--preset tiny] [--questions 40] [--choices 4]
        [--context-words 64] [--threads 2]

The task is written locally (tests/lm_eval_tasks.py: YAML + JSON lines, nothing downloaded). Prints both wall
times, their ratio (hf / ours: above 1 means the server is faster), the largest per-choice log-likelihood
difference and the prefix-cache hit rate; the last line is ``RESULT name=value ...``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the task writer, shared with tests

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from frugallm.config import ModelConfig, preset  # noqa: E402
from frugallm.model import build_model  # noqa: E402
from frugallm.model.hf import save_pretrained  # noqa: E402
from lm_eval_tasks import WORDS, evaluate, write_tasks  # noqa: E402


def make_model_dir(root: Path, cfg: ModelConfig) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    vocab = min(cfg.vocab_size, 512)
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", '
        f'"model_max_length": {cfg.max_position_embeddings}}}')
    save_pretrained(build_model(cfg, seed=0), root / "model",
                    extra_files={"tokenizer.json": root / "tokenizer.json",
                                 "tokenizer_config.json": root / "tokenizer_config.json"})
    return root / "model"


def loglikelihoods(results: dict) -> list[float]:
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return [r[0][0] for s in samples for r in s["resps"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--context-words", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1, help="lm-eval's batch size, both models (for the "
                    "server: prompts per request)")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    torch.set_num_threads(args.threads)
    import uvicorn

    from frugallm.serve.engine import Engine, EngineConfig
    from frugallm.serve.loading import load_for_serving
    from frugallm.serve.server import create_app

    cfg = preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "datasets")
        model_dir = make_model_dir(Path(tmp) / "m", cfg)
        tasks = write_tasks(Path(tmp) / "tasks", n_mc=args.questions, n_gen=0, n_choices=args.choices,
                            context_words=args.context_words)
        (tasks / "tiny_gen.yaml").unlink()
        model, codec = load_for_serving(model_dir)
        engine = Engine(model, codec, EngineConfig(block_size=16, cache_memory=64 << 20))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port,
                                               log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        ours = evaluate("local-completions", f"model=bench,base_url=http://127.0.0.1:{port}/v1/completions,"
                        f"tokenizer={model_dir},tokenized_requests=True,max_length={cfg.max_position_embeddings}",
                        ["tiny_mc"], tasks, batch_size=args.batch_size)
        t_ours = ours["scoring_seconds"]
        hit_rate = engine.stats()["cache_hit_rate"]
        server.should_exit = True
        thread.join(timeout=10)
        del engine, model
        theirs = evaluate("hf", f"pretrained={model_dir},dtype=float32", ["tiny_mc"], tasks,
                          batch_size=args.batch_size)
        t_hf = theirs["scoring_seconds"]
    a, b = loglikelihoods(ours), loglikelihoods(theirs)
    delta = max(abs(x - y) for x, y in zip(a, b, strict=True))
    print(f"{args.questions} questions x {args.choices} choices, preset {args.preset}, {args.threads} threads, "
          f"batch size {args.batch_size}")
    print(f"  server (local-completions): {t_ours:.2f} s   prefix-cache hit rate {hit_rate:.1%}")
    print(f"  transformers (hf):          {t_hf:.2f} s")
    print(f"  hf / server: {t_hf / t_ours:.2f}x   max |delta loglik| {delta:.2e}")
    print(f"RESULT ours_s={t_ours:.3g} hf_s={t_hf:.3g} ratio_hf_over_ours={t_hf / t_ours:.3g} "
          f"cache_hit_rate={hit_rate:.3g} max_delta_loglik={delta:.3g} requests={len(a)} batch_size={args.batch_size}")


if __name__ == "__main__":
    main()
