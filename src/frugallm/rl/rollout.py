"""Rollouts for GRPO from the serving engine: G samples of each prompt, with the log-probability the engine
computed for every sampled token.

The engine (``serve.engine``) runs over the very modules the trainer updates, so the weights reach it after
every update in memory, with no copy; ``Engine.weights_updated()`` then drops the prefix blocks the old
weights computed. A group's G samples share their prompt: the first sample of each prompt is prefilled on
its own (two tokens), which publishes the prompt's full blocks, and then all P * G samples start from the
prefix cache and decode together in one continuous batch.

Log-probabilities are the engine's, at temperature 1 (``serve.sampling.TokenLogprob``): the policy whose
ratio GRPO clips is the model itself; the sampling temperature only shapes exploration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from frugallm.serve.engine import Engine, EngineConfig
from frugallm.serve.sampling import SamplingParams


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # [B] the prompt of each sequence
    completion_ids: list[list[int]]  # [B] sampled tokens, the end-of-sequence token included when it stopped there
    old_logprobs: list[list[float]]  # [B] the engine's log pi_old of each completion token
    texts: list[str]  # [B] decoded completions (without the end-of-sequence token)
    group: list[int]  # [B] which prompt each sequence samples
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def rollout_engine(model: torch.nn.Module, codec: object, *, sequences: int, longest: int) -> Engine:
    """The engine GRPO samples from: room for ``sequences`` sequences of ``longest`` tokens decoding together,
    8-token blocks (short prompts still share most of themselves), and no MTP drafting: a verify forward
    carries two tokens per sequence, which at a rollout's batch size costs more than it saves (measured on
    the demo model, 128 sequences: 914 tokens/s plain against 666 drafting at 77% acceptance)."""
    from frugallm.serve.cache import cache_bytes_per_token

    per_token = cache_bytes_per_token(model.config, next(model.parameters()).dtype)
    cache = int(per_token * longest * (sequences + 8) * 1.5)
    return Engine(model, codec, EngineConfig(block_size=8, cache_memory=max(cache, 8 * 2**20), max_batch=sequences,
                                             max_queue=max(2 * sequences, 64), speculative=False,
                                             decode_attention=_decode_attention(model)))


def _decode_attention(model: torch.nn.Module) -> str:
    """The expanded decode over a frozen e4m3 base (LoRA over published FP8 weights): it runs kv_b_proj's own
    FP8 GEMM, as the trainer's forward does, so pi_old equals the trainer's log pi; the absorbed decode would
    multiply by the dequantized weight without quantizing the activation (about 3e-4 apart in log-probability
    on the test's micro model). Otherwise the absorbed one."""
    from frugallm.precision.frozen import FrozenFp8Linear

    return "expanded" if any(isinstance(m, FrozenFp8Linear) for m in model.modules()) else "absorbed"


def sample_groups(engine: Engine, prompts: list[list[int]], group_size: int, *, max_new_tokens: int,
                  temperature: float, top_p: float = 1.0, seed: int = 0) -> Rollout:
    """``group_size`` samples of each prompt (token ids), seeded per sample so that a run is reproducible."""
    t0 = time.perf_counter()
    before = dict(engine.counters)
    # publishes each prompt's full blocks for its group; two tokens, so that with MTP drafting the draft
    # module's rows of the prompt are final too (a sequence done at its first token never runs it)
    engine.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    hits0, misses0 = engine.counters["cache_hit_tokens"], engine.counters["cache_miss_tokens"]
    rows = [(p, g) for p in range(len(prompts)) for g in range(group_size)]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, logprobs=0,
                             seed=_seed(seed, p, g)) for p, g in rows]
    done = engine.generate([prompts[p] for p, _ in rows], params)
    hits = engine.counters["cache_hit_tokens"] - hits0
    misses = engine.counters["cache_miss_tokens"] - misses0
    completions, logprobs, texts = [], [], []
    for c in done:
        ids = list(c.token_ids)
        lps = [lp.logprob for lp in c.logprobs]
        if c.eos is not None:  # the model chose to stop: that choice is trained too
            ids.append(c.eos.token)
            lps.append(c.eos.logprob)
        completions.append(ids)
        logprobs.append(lps)
        texts.append(c.text)
    seconds = time.perf_counter() - t0
    generated = engine.counters["completion_tokens"] - before["completion_tokens"]
    stats = {"rollout_seconds": seconds, "rollout_tokens_per_s": generated / seconds if seconds else 0.0,
             "prefix_cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0}
    return Rollout([prompts[p] for p, _ in rows], completions, logprobs, texts, [p for p, _ in rows], stats)


def greedy_answers(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    done = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0))
    return [c.text for c in done]


def _seed(seed: int, prompt: int, sample: int) -> int:
    return (seed * 1_000_003 + prompt * 7919 + sample) % (2**63)


@dataclass
class PolicyBatch:
    """Sequences laid out for the trainer's forward: right-padded prompt + completion."""

    input_ids: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L - 1] the next token at each position
    mask: torch.Tensor  # [B, L - 1] 1 where the target is a completion token
    old_logprobs: torch.Tensor  # [B, L - 1] the engine's log-probabilities there (0 elsewhere)


def policy_batch(rollout: Rollout, rows: list[int], pad_id: int = 0) -> PolicyBatch:
    seqs = [rollout.prompt_ids[i] + rollout.completion_ids[i] for i in rows]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L - 1)
    old = torch.zeros(len(rows), L - 1)
    for b, i in enumerate(rows):
        s, n_p, n_c = seqs[b], len(rollout.prompt_ids[i]), len(rollout.completion_ids[i])
        ids[b, : len(s)] = torch.tensor(s)
        # the logits at position t predict token t + 1: completion token j sits at n_p + j, predicted at n_p + j - 1
        mask[b, n_p - 1 : n_p - 1 + n_c] = 1
        old[b, n_p - 1 : n_p - 1 + n_c] = torch.tensor(rollout.old_logprobs[i], dtype=torch.float32)
    return PolicyBatch(ids, ids[:, 1:], mask, old)


__all__ = ["PolicyBatch", "Rollout", "greedy_answers", "policy_batch", "rollout_engine", "sample_groups"]
