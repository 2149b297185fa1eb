"""frugallm.serve: the inference engine and the OpenAI-compatible server.

cache.py (paged latent KV cache, prefix index, disk spill) -> runner.py (the model's forward over the cache:
expanded prefill, absorbed decode) -> engine.py (scheduler: continuous batching, prefix reuse, MTP speculative
decoding) -> server.py (HTTP) and cli.py (``frugallm serve``, ``frugallm generate``); sampling.py chooses
tokens, loading.py reads a run or Hugging Face directory and its tokenizer.
"""
