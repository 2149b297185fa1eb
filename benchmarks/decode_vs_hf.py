"""Decoding with the frugallm serving engine against transformers' ``DeepseekV3ForCausalLM.generate``, same
configuration and same weights, in one process. Prints a table and a final RESULT line.

    .venv/bin/python benchmarks/decode_vs_hf.py [--preset tiny] [--contexts 512 4096] [--new-tokens 32]
        [--streams 16] [--mtp-model RUN_OR_HF_DIR] [--train-seconds 60] [--threads 2] [--groups 16 8]
        [--profile]

Measured, each at every context length (a random prompt of that many tokens, greedy decoding):
- decode tokens per second after the prompt (the first token's time excluded on both sides);
- KV cache memory: ours is the latent rows of the blocks the sequence holds (the formula is
  ``(kv_lora_rank + qk_rope_head_dim) * layers * dtype bytes`` per token); transformers' is the tensors its
  ``DynamicCache`` holds after the same prompt. transformers also caches the latent, but re-expands K and V
  for every cached token at every step; our decode absorbs W_UK and W_UV and attends over the latent.
Then, with our engine only: the aggregate decode throughput of ``--streams`` concurrent sequences against one;
and the speedup of MTP speculative decoding (greedy, identical tokens) on a model trained with MTP: a run or
HF directory given with ``--mtp-model`` (e.g. the output of ``make demo``), else a small byte-level model
trained here for ``--train-seconds`` on the Python standard library's source.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from frugallm.config import ModelConfig, preset
from frugallm.model import build_model
from frugallm.serve.cache import cache_bytes_per_token
from frugallm.serve.engine import Engine, EngineConfig
from frugallm.serve.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))  # rollout_vs_hf, for the batched-sampling figure


def hf_model(cfg: ModelConfig, ours: torch.nn.Module):
    import transformers

    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                              if k not in ("architectures", "model_type")})
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    theirs = model.state_dict()
    copied = 0
    with torch.no_grad():
        for name, t in ours.state_dict().items():  # module names match; model.mtp.* has no HF twin
            if name in theirs:
                theirs[name].copy_(t)
                copied += 1
    missing = [n for n in theirs if n not in ours.state_dict() and not n.endswith("inv_freq")]
    assert not missing, f"weights not copied: {missing[:3]}"
    model.generation_config.eos_token_id = None  # decode exactly the asked number of tokens
    model.generation_config.pad_token_id = 0
    return model


class _Clock:
    """A transformers streamer that timestamps every new token (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(int(value.flatten()[-1]))

    def end(self) -> None:
        pass


def hf_decode(model, ids: list[int], new: int) -> tuple[float, list[int], int]:
    """(decode tokens/s after the first token, generated tokens, cache bytes after the prompt)."""
    clock = _Clock()
    x = torch.tensor([ids])
    with torch.no_grad():
        model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
        out = model(x, use_cache=True)
    decode = clock.times[-1] - clock.times[1]  # times[0]: the prompt; times[1]: the first new token
    return (new - 1) / decode, clock.tokens[1:], _cache_bytes(out.past_key_values)


def _cache_bytes(cache) -> int:
    tensors = []
    for layer in getattr(cache, "layers", []):
        tensors += [getattr(layer, a, None) for a in ("keys", "values")]
    for a in ("key_cache", "value_cache"):
        tensors += list(getattr(cache, a, []) or [])
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def our_decode(engine: Engine, prompts: list[list[int]], new: int, params: SamplingParams | None = None
               ) -> tuple[float, list[list[int]], int]:
    """(aggregate decode tokens/s after every prompt's first token, tokens, cache bytes held after prefill)."""
    params = params or SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    rids = [engine.submit(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    started, held = None, 0
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        if started is None and all(tokens[r] for r in rids):
            started = time.perf_counter()  # every prompt is in and has its first token
            held = engine.pool.used_blocks() * engine.pool.block_bytes
    elapsed = time.perf_counter() - started
    return len(prompts) * (new - 1) / elapsed, [tokens[r] for r in rids], held


def mtp_model(args: argparse.Namespace) -> tuple[torch.nn.Module, list[list[int]], str, object]:
    """(model, prompts, where it came from, token ids -> text)."""
    if args.mtp_model:
        from frugallm.serve.loading import load_for_serving

        model, codec = load_for_serving(args.mtp_model)
        texts = ["The cost of a model", "def main():\n    ", "Once upon a time", "import torch\n"]
        return model, [codec.encode(t) for t in texts], args.mtp_model, codec.decode
    # bytes of the standard library's Python source: structured enough that a second token is predictable
    import sysconfig

    src = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(src.glob("*.py"))[:60])
    data = torch.tensor(list(data), dtype=torch.long)
    # dense FFN: it trains several times faster on a CPU than the MoE, and drafting does not depend on it
    cfg = ModelConfig(vocab_size=256, hidden_size=128, num_hidden_layers=4, intermediate_size=512,
                      num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32, ffn="dense", num_nextn_predict_layers=1,
                      max_position_embeddings=1024, initializer_range=0.02)
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.train_seconds:
        starts = torch.randint(0, len(data) - 130, (16,), generator=gen)
        batch = data[starts[:, None] + torch.arange(130)]  # [16, 130]
        out = model.forward_train(batch)
        loss = out.loss + 0.3 * out.mtp_losses[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    prompts = [list(b) for b in (b"import os\nimport sys\n\n\ndef ", b"class Foo:\n    def __init__(self",
                                 b"    for i in range(", b"        if not isinstance(")]
    origin = f"byte-level, trained {steps} steps, final loss {out.loss.item():.2f}"
    return model.eval(), prompts, origin, lambda ids: bytes(ids).decode("utf-8", errors="replace")


def mtp_speedup(model: torch.nn.Module, prompts: list[list[int]], args: argparse.Namespace, temperature: float,
                decode) -> tuple[float, float, bool, str]:
    """(median tokens/s with drafting / without, acceptance rate, same tokens, an example) on one stream."""
    engines = {spec: Engine(model, None, EngineConfig(speculative=spec, max_batch=1, cache_memory=64 * 2**20,
                                                      prefix_cache=False))
               for spec in (False, True)}
    for eng in engines.values():
        eng.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    speeds: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[list[int]]] = {False: [], True: []}
    for r in range(max(args.repeats, 3)):
        for i, p in enumerate(prompts):
            for spec in (False, True):  # alternating, so both sides see the same machine load
                params = SamplingParams(max_tokens=args.mtp_tokens, temperature=temperature, seed=100 * r + i,
                                        ignore_eos=True)
                tps, toks, _ = our_decode(engines[spec], [p], args.mtp_tokens, params)
                speeds[spec].append(tps)
                if r == 0:
                    outputs[spec].append(toks[0])
    speedup = statistics.median(speeds[True]) / statistics.median(speeds[False])
    example = f"{decode(prompts[0])!r} -> {decode(outputs[True][0][:48])!r}"
    return speedup, engines[True].stats()["acceptance_rate"], outputs[True] == outputs[False], example


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096], help="prompt lengths in tokens")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per measurement")
    ap.add_argument("--streams", type=int, default=16, help="concurrent sequences for the batching figure")
    ap.add_argument("--mtp-model", default=None, help="run or HF directory of a model trained with MTP")
    ap.add_argument("--train-seconds", type=float, default=60, help="training time of the fallback MTP model")
    ap.add_argument("--mtp-tokens", type=int, default=96, help="tokens per prompt for the MTP figure")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2,
                    help="measurements per figure, alternating the two sides; the best is kept (shared machines)")
    ap.add_argument("--groups", type=int, nargs=2, default=[16, 8], metavar=("PROMPTS", "SAMPLES"),
                    help="the batched-sampling figure: SAMPLES samples of each of PROMPTS prompts (0 0: skip)")
    ap.add_argument("--profile", action="store_true",
                    help="then profile our decode step at each context and print where its time goes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    longest = max(args.contexts) + args.new_tokens + 8
    cfg = preset(args.preset).replace(num_nextn_predict_layers=0,  # transformers has no MTP
                                      max_position_embeddings=max(longest, preset(args.preset).max_position_embeddings))
    ours = build_model(cfg, seed=0).eval()
    theirs = hf_model(cfg, ours)
    formula = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    assert cache_bytes_per_token(cfg, torch.float32) == formula
    pool_bytes = 2 * (longest * formula) + 64 * 2**20

    def engine(**kw) -> Engine:
        return Engine(ours, None, EngineConfig(cache_memory=pool_bytes, max_model_len=longest, speculative=False,
                                               prefill_chunk=1024, **kw))

    rows, result = [], {}
    print(f"model: preset {args.preset} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, r_kv {cfg.kv_lora_rank}, d_r {cfg.qk_rope_head_dim}), float32, "
          f"{args.threads} threads", file=sys.stderr)
    for ctx in args.contexts:
        ids = torch.randint(0, cfg.vocab_size, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
        engine(max_batch=1).generate([ids[:64]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        hf_runs, our_runs = [], []
        for _ in range(args.repeats):
            hf_runs.append(hf_decode(theirs, ids, args.new_tokens))
            our_runs.append(our_decode(engine(max_batch=1), [ids], args.new_tokens))
        hf_tps, hf_tokens, hf_bytes = max(hf_runs, key=lambda r: r[0])
        our_tps, our_tokens, our_bytes = max(our_runs, key=lambda r: r[0])
        agree = next((i for i, (a, b) in enumerate(zip(hf_tokens, our_tokens[0], strict=False)) if a != b),
                     len(hf_tokens))
        rows.append((ctx, hf_tps, our_tps, hf_bytes, our_bytes, agree))
        result[f"decode_speedup_{ctx}"] = our_tps / hf_tps
        result[f"ours_tok_s_{ctx}"] = our_tps
        result[f"hf_tok_s_{ctx}"] = hf_tps
        result[f"hf_cache_bytes_per_token_{ctx}"] = hf_bytes / ctx

    print(f"\n{'context':>8} {'HF tok/s':>9} {'ours tok/s':>10} {'speedup':>8} {'HF cache':>10} {'ours cache':>10} "
          f"{'greedy agrees for':>18}")
    for ctx, h, o, hb, ob, agree in rows:
        print(f"{ctx:>8} {h:>9.1f} {o:>10.1f} {o / h:>7.2f}x {hb / 2**20:>8.2f}Mi {ob / 2**20:>8.2f}Mi "
              f"{agree:>10}/{args.new_tokens} tokens")
    print(f"cache bytes per token: ours {engine().cache_bytes_per_token} = (kv_lora_rank {cfg.kv_lora_rank} + "
          f"qk_rope {cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} layers x 4 bytes = {formula}; "
          f"HF {rows[-1][3] / rows[-1][0]:.0f}")

    # continuous batching: N streams at the shortest context against one
    ctx = min(args.contexts)
    prompts = [torch.randint(0, cfg.vocab_size, (ctx,), generator=torch.Generator().manual_seed(100 + i)).tolist()
               for i in range(args.streams)]
    one = many = 0.0
    for _ in range(args.repeats):
        one = max(one, our_decode(engine(max_batch=1), prompts[:1], args.new_tokens)[0])
        many = max(many, our_decode(engine(max_batch=args.streams), prompts, args.new_tokens)[0])
    print(f"\n{args.streams} concurrent streams at context {ctx}: {many:.1f} tok/s aggregate against {one:.1f} "
          f"for one stream ({many / one:.2f}x)")
    result.update(batch_streams=args.streams, batch_throughput_ratio=many / one)

    # many samples of each prompt (GRPO rollouts, n > 1): benchmarks/rollout_vs_hf.py's measurement
    if args.groups[0] > 0:
        from rollout_vs_hf import ours as group_ours
        from rollout_vs_hf import theirs as group_theirs

        g = torch.Generator().manual_seed(1)
        gprompts = torch.randint(3, cfg.vocab_size, (args.groups[0], 64), generator=g).tolist()
        mine = hfs = 0.0
        for _ in range(args.repeats):
            mine = max(mine, group_ours(ours, gprompts, args.groups[1], args.new_tokens)[0])
            hfs = max(hfs, group_theirs(theirs, gprompts, args.groups[1], args.new_tokens))
        print(f"\n{args.groups[1]} samples of each of {args.groups[0]} prompts (64 prompt + {args.new_tokens} new "
              f"tokens, temperature 1): {mine:.1f} tok/s against transformers' generate(num_return_sequences="
              f"{args.groups[1]}) {hfs:.1f} ({mine / hfs:.2f}x)")
        result.update(group_tok_s=mine, hf_group_tok_s=hfs, group_speedup=mine / hfs)

    if args.profile:
        print(f"\nwhere our decode step's time goes (one stream, {min(16, args.new_tokens)} profiled steps, per step):")
        print(f"{'context':>8}{'wall ms':>9}{'ops':>7}{'allocs':>8}{'GEMM ms':>9}{'copies ms':>10}"
              f"{'other ops ms':>13}{'Python ms':>10}  largest other operators")
        for ctx in args.contexts:
            ids = torch.randint(0, cfg.vocab_size, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
            print(f"{ctx:>8}" + profile_decode(engine(max_batch=1), ids, steps=min(16, args.new_tokens)))
        print("ops: operator calls (views included); allocs: tensor allocations; copies: copy, gather, scatter "
              "and concatenation operators; Python: the step's wall time not spent inside an operator "
              "(interpreter, scheduling, dispatch)")

    # MTP speculative decoding
    model, mprompts, origin, decode = mtp_model(args)
    for label, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        speedup, acceptance, same, sample_text = mtp_speedup(model, mprompts, args, temperature, decode)
        print(f"\nMTP speculation, {label} ({origin}): {speedup:.2f}x tokens/s, acceptance {acceptance:.0%}"
              + (f", identical greedy output: {same}" if temperature == 0 else ""))
        print(f"  e.g. {sample_text}")
        result[f"mtp_speedup_{label}"] = speedup
        result[f"mtp_acceptance_{label}"] = acceptance
        if temperature == 0:
            result["mtp_identical"] = int(same)
    result.update(cache_bytes_per_token=engine().cache_bytes_per_token, latent_formula_bytes=formula)
    print("RESULT " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


GEMM_OPS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm", "mkldnn::_linear_pointwise"}
COPY_OPS = {"aten::copy_", "aten::index_select", "aten::index_copy_", "aten::cat", "aten::index_add_", "aten::gather",
            "aten::scatter", "aten::scatter_", "aten::clone", "aten::stack"}


def profile_decode(engine: Engine, ids: list[int], steps: int = 16) -> str:
    """Run one sequence through its prefill, then profile ``steps`` decode steps: wall time, operator calls,
    allocations and operator self time by kind per step; Python is wall time minus operator self time."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    engine.submit(ids, SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True))
    while not engine.running:
        engine.step()
    for _ in range(3):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - t0) / steps * 1e3
    parts: Counter[str] = Counter()
    other: Counter[str] = Counter()
    ops = allocs = 0
    for e in prof.events():
        if e.name == "[memory]":
            allocs += e.cpu_memory_usage > 0
            continue
        ops += 1
        ms = e.self_cpu_time_total / 1e3 / steps
        kind = "gemm" if e.name in GEMM_OPS else "copy" if e.name in COPY_OPS else "other"
        parts[kind] += ms
        if kind == "other":
            other[e.name] += ms
    engine.abort_all()
    python = wall - sum(parts.values())
    top = ", ".join(f"{n.split('::')[-1]} {ms:.2f}" for n, ms in other.most_common(4))
    return (f"{wall:>9.2f}{ops / steps:>7.0f}{allocs / steps:>8.0f}{parts['gemm']:>9.2f}{parts['copy']:>10.2f}"
            f"{parts['other']:>13.2f}{python:>10.2f}  {top}")


if __name__ == "__main__":
    main()
