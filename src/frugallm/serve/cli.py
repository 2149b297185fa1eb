"""``frugallm serve`` (the OpenAI-compatible server) and ``frugallm generate`` (one prompt, same engine)."""

from __future__ import annotations

import argparse
import sys
import time

from frugallm.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def _engine_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch

    from frugallm.serve.engine import EngineConfig

    return EngineConfig(block_size=args.block_size, cache_memory=int(args.cache_memory_mb * 2**20),
                        max_batch=args.max_batch, max_queue=getattr(args, "max_queue", 64),
                        max_model_len=args.max_model_len, prefix_cache=not args.no_prefix_cache,
                        spill_dir=args.spill_dir, speculative=not args.no_speculative,
                        spec_min_acceptance=args.spec_min_acceptance,
                        cache_dtype=getattr(torch, args.cache_dtype) if args.cache_dtype else None)


def _dtype(name: str):  # type: ignore[no-untyped-def]
    import torch

    return getattr(torch, name)


def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise ConfigError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a training run directory or a Hugging Face DeepSeek-V3 "
                   "directory (config.json + safetensors + tokenizer.json)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute dtype")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: decoding small models is per-op latency, and extra threads "
                        "stall whenever another process holds a core)")
    p.add_argument("--cache-dtype", choices=DTYPES, default=None, help="KV cache dtype (default: --dtype)")
    p.add_argument("--cache-memory-mb", type=float, default=256.0, help="KV cache pool size in MiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--no-prefix-cache", action="store_true", help="do not reuse cached prompt prefixes")
    p.add_argument("--spill-dir", default=None, help="directory to spill evicted prefix blocks to and reload from")
    p.add_argument("--no-speculative", action="store_true", help="do not draft with the MTP module")
    p.add_argument("--spec-min-acceptance", type=float, default=0.3,
                   help="a sequence whose recent drafts were accepted less often than this fraction pauses drafting")


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from frugallm.serve.auth import load_keys
    from frugallm.serve.server import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.price_per_hour < 0:
        raise ConfigError(f"--price-per-hour must be >= 0, got {args.price_per_hour}")
    _set_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(args.model_dir, host=args.host, port=args.port, model_name=args.model_name,
          price_per_hour=args.price_per_hour, engine_config=_engine_config(args), dtype=_dtype(args.dtype),
          log_level=args.log_level, api_keys=load_keys(args.api_key or (), args.api_key_file),
          max_n=args.max_n, adapters=_adapters(args.adapter or ()))
    return 0


def _adapters(specs: list[str]) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter wants NAME=PATH, got {spec!r}")
        out.append((name, path))
    return out


def run_generate(args: argparse.Namespace) -> int:
    from frugallm.serve.engine import Engine
    from frugallm.serve.loading import load_for_serving
    from frugallm.serve.sampling import RequestError, SamplingParams

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _set_threads(args.threads)
    model, codec = load_for_serving(args.model_dir, dtype=_dtype(args.dtype))
    engine = Engine(model, codec, _engine_config(args))
    prompt = codec.render_chat([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    try:
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed,
                                stop=tuple(args.stop or ()) + (codec.chat_stops if args.chat else ()))
        ids = codec.encode(prompt, add_special_tokens=not args.chat)
        rid = engine.submit(ids, params)
    except RequestError as e:
        raise ConfigError(str(e)) from None
    t0 = time.perf_counter()
    if not args.chat:
        sys.stdout.write(args.prompt)
    usage, reason, first = None, None, None
    while usage is None:
        for out in engine.step():
            if out.request_id != rid:
                continue
            first = first or time.perf_counter()
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finished:
                usage, reason = out.usage, out.finish_reason
    end = time.perf_counter()
    sys.stdout.write("\n")
    s = engine.stats()
    n = usage.completion_tokens
    rate = f"{(n - 1) / (end - first):.1f} tokens/s after the first" if n > 1 and end > first else "-"
    line = (f"[{n} tokens in {end - t0:.2f} s (first after {first - t0:.2f} s), {rate}, finish: {reason}, "
            f"prompt {usage.prompt_tokens} tokens, cache {engine.cache_bytes_per_token} bytes/token")
    if engine.spec:
        line += f", MTP acceptance {s['acceptance_rate']:.0%}"
    print(line + "]", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    _engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model-name", default=None, help="the model id clients ask for (default: the directory name)")
    p.add_argument("--price-per-hour", type=float, default=None,
                   help="device price in dollars per hour, for each request's cost in its usage (default: the "
                        "--gpu's catalogue price, else 0: no cost is counted)")
    p.add_argument("--gpu", default=None, help="take the device price from the hardware catalogue "
                   "(a name as `frugallm cost` knows it, e.g. h100)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for admission before 503")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1 routes (repeatable; also FRUGALLM_API_KEY)")
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="API keys, one a line")
    p.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH",
                   help="serve a LoRA adapter (PEFT directory or LoRA run) as model NAME beside the base "
                        "(repeatable; one copy of the base weights, adapters mixed in batches)")
    p.add_argument("--max-n", type=int, default=8, help="most samples (n) one request may ask for")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_serve_with_default_price)

    g = sub.add_parser("generate", help="generate text from one prompt with the serving engine")
    _engine_flags(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely tokens (-1: all)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.set_defaults(func=run_generate)


def _serve_with_default_price(args: argparse.Namespace) -> int:
    from frugallm.serve.server import DEFAULT_PRICE_PER_HOUR

    if args.price_per_hour is None and args.gpu:
        from frugallm.cost.hardware import get_device

        device = get_device(args.gpu)
        if device.price_per_hour is None:
            raise ConfigError(f"the hardware catalogue has no price for {device.name}; pass --price-per-hour")
        args.price_per_hour = device.price_per_hour
    if args.price_per_hour is None:
        args.price_per_hour = DEFAULT_PRICE_PER_HOUR
    return run_serve(args)
