"""GRPO-shaped sampling: G samples of each of P prompts, our serving engine (``rl.rollout.sample_groups`` on the
engine ``frugallm rl`` builds, ``rollout_engine``: the group's prompt prefilled once and shared through the prefix cache, all P * G sequences decoding in one
continuous batch over the latent cache) against transformers' ``generate(num_return_sequences=G)`` over
all P prompts in one batched call, same configuration, same weights, same prompt and output lengths, in one
process. Prints a table and a final RESULT line (generated tokens per second, ours / theirs).

    .venv/bin/python benchmarks/rollout_vs_hf.py [--model RUN_OR_HF_DIR] [--preset tiny] [--prompts 16]
        [--group 8] [--prompt-tokens 64] [--new-tokens 32] [--threads 2] [--repeats 2]

Both sample at temperature 1 with end-of-sequence stopping off, so that every sequence has exactly
``--new-tokens`` tokens on both sides. Without ``--model`` the weights are a random init of ``--preset``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_vs_hf import hf_model  # noqa: E402

from frugallm.config import preset  # noqa: E402
from frugallm.model import build_model  # noqa: E402
from frugallm.rl.rollout import rollout_engine, sample_groups  # noqa: E402
from frugallm.serve.sampling import SamplingParams  # noqa: E402


def ours(model, prompts: list[list[int]], group: int, new: int) -> tuple[float, dict]:
    engine = rollout_engine(model, None, sequences=len(prompts) * group, longest=len(prompts[0]) + new + 4)
    engine.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0))  # warm-up: first-call costs
    engine.weights_updated()  # and no cached prompt from it
    t0 = time.perf_counter()
    ro = sample_groups(engine, prompts, group, max_new_tokens=new, temperature=1.0, seed=0)
    dt = time.perf_counter() - t0
    assert all(len(c) == new for c in ro.completion_ids), "an engine sequence stopped early"
    return len(prompts) * group * new / dt, ro.stats


def theirs(model, prompts: list[list[int]], group: int, new: int) -> float:
    x = torch.tensor(prompts)
    with torch.no_grad():
        model.generate(x[:1], max_new_tokens=2, do_sample=True)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0,
                             top_k=0, num_return_sequences=group)
        dt = time.perf_counter() - t0
    assert out.shape == (len(prompts) * group, x.shape[1] + new)
    return len(prompts) * group * new / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a run or Hugging Face directory (default: random --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from frugallm.rundir import load_model

        model, _ = load_model(args.model, dtype=torch.float32)
        source = args.model
    else:
        model = build_model(preset(args.preset), seed=0)
        source = f"random {args.preset}"
    model.eval()
    cfg = model.config
    hf = hf_model(cfg, model)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (args.prompts, args.prompt_tokens), generator=g).tolist()
    a, b, stats = [], [], {}
    for _ in range(args.repeats):
        tps, stats = ours(model, prompts, args.group, args.new_tokens)
        a.append(tps)
        b.append(theirs(hf, prompts, args.group, args.new_tokens))
    mine, hfs = statistics.median(a), statistics.median(b)
    print(f"model: {source}; {args.prompts} prompts x {args.group} samples, {args.prompt_tokens} prompt + "
          f"{args.new_tokens} new tokens each, temperature 1, {args.threads} threads, median of {args.repeats}")
    print(f"{'':32}{'generated tokens/s':>20}")
    print(f"{'frugallm engine (sample_groups)':32}{mine:>20.1f}")
    print(f"{'transformers generate':32}{hfs:>20.1f}")
    print(f"prefix-cache hit rate of the group samples: {stats.get('prefix_cache_hit_rate', 0):.1%}")
    print(f"RESULT rollout_tokens_per_s_ratio={mine / hfs:.2f} ours_tokens_per_s={mine:.1f} "
          f"hf_tokens_per_s={hfs:.1f} prefix_cache_hit_rate={stats.get('prefix_cache_hit_rate', 0):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
