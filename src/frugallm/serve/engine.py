"""The serving engine: a scheduler over one paged latent cache, with continuous batching, prefix caching and
MTP speculative decoding. ``Engine.step()`` advances every admitted sequence by one step; callers (the HTTP
server's worker thread, ``frugallm generate``, tests) loop on it.

Lifecycle of a sequence
    submit     validated at once (context length, cache capacity, queue bound); waits in a FIFO
    admit      when a running slot is free and the pool can promise every block the sequence may ever need
               (prompt + max_tokens, reserved up front so a running sequence never meets a full cache);
               its prompt's full blocks are looked up by chained hash and every hit is shared, not computed;
               a prompt whose first missing block another sequence is prefilling waits for it (one step)
    scoring    with ``prompt_logprobs`` every prompt position's logits are kept as log-probabilities (and
               beside each published block, so a later prompt sharing the context gets them from the cache);
               ``max_tokens`` 0 finishes after the prefill
    prefill    the rest of the prompt in chunks of ``prefill_chunk`` tokens through the expanded attention;
               the last chunk's logits give the first token
    decode     all running sequences together, one new token each through the absorbed attention; with MTP,
               [pending token, draft] each, verified in the same forward, then the MTP block drafts again
    finish     EOS, a stop string, max_tokens, the context end or an abort; its blocks go back (full ones to
               the prefix cache's LRU, the rest to the free list) and its reservation is returned

Speculative decoding bookkeeping (one draft per step, from MTP module 1; deeper modules are not used). With N
committed tokens the last one is "pending": sampled but not yet through the model, so the main cache holds
positions 0 .. N-2 (``n_cached = N - 1``). MTP at position i combines the main hidden state h_i with the
embedding of token i+1 and predicts token i+2, so it can run on positions whose next token is committed,
0 .. N-2 (``n_mtp = N - 1``); its output at N-2 predicts token N, the draft for the position after the pending
token. A verify forward feeds [pending, draft] at positions N-1, N: the main logits at N-1 decide whether the
draft stands, and the logits at N give a bonus token when it does.

Drafting pays only when drafts are accepted often enough to cover the MTP block's cost. A sequence whose last
``SPEC_WINDOW`` drafts were accepted less often than ``spec_min_acceptance`` stops drafting for a while (16
steps, doubling at each relapse up to 128) and decodes plainly; its main hidden states queue up in ``h_tail``
and the MTP block catches up on all of them in one forward when drafting resumes.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.nn.utils.rnn import pad_sequence

from frugallm.errors import ConfigError
from frugallm.model.transformer import DeepseekV3LM
from frugallm.serve.cache import BlockPool, CacheLayout, cache_bytes_per_token, chain_hash, entry_width
from frugallm.serve.runner import ModelRunner, Row
from frugallm.serve.sampling import (
    MAX_LOGPROBS,
    QueueFullError,
    RequestError,
    SamplingParams,
    TextStream,
    TokenLogprob,
    logprob_rows,
    make_generator,
    position_logprobs,
    sample,
    sample_rows,
    verify,
)

if TYPE_CHECKING:
    from frugallm.serve.loading import Codec


SPEC_WINDOW = 4  # drafts over which a sequence's acceptance is judged
SPEC_BACKOFF = (16, 128)  # steps without drafting after a poor window: first, most
# prompt log-probabilities kept beside published blocks (by block hash), so a scoring request whose context
# comes from the prefix cache still has every position's log-probability: at most this many blocks' worth
# (each block_size * (1 + MAX_LOGPROBS) floats and ids; ~5 KiB at block size 16)
PROMPT_LOGPROB_BLOCKS = 4096


@dataclass(kw_only=True)
class EngineConfig:
    block_size: int = 16  # tokens per cache block
    cache_memory: int = 256 * 2**20  # bytes for the whole KV cache pool
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # requests waiting for admission before submit() refuses
    max_model_len: int | None = None  # prompt + output; None: the model's max_position_embeddings
    prefill_chunk: int = 512  # prompt tokens per step, so long prompts do not stall running decodes
    prefix_cache: bool = True
    spill_dir: str | None = None  # evicted prefix blocks go here and come back from here
    spill_max_bytes: int | None = None
    speculative: bool = True  # MTP drafting, when the model has MTP modules
    spec_min_acceptance: float = 0.3  # below this recent acceptance a sequence pauses drafting
    decode_attention: str = "absorbed"  # MLA decode path: absorbed (serving) or expanded (reference)
    cache_dtype: torch.dtype | None = None  # None: the model's dtype
    record_logits: bool = False  # keep each sampled token's logits (tests)

    def __post_init__(self) -> None:
        for name in ("block_size", "cache_memory", "max_batch", "prefill_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ConfigError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not 0 <= self.spec_min_acceptance <= 1:
            raise ConfigError(f"spec_min_acceptance must be in [0, 1], got {self.spec_min_acceptance!r}")
        if self.decode_attention not in ("absorbed", "expanded"):
            raise ConfigError(f"decode_attention must be 'absorbed' or 'expanded', got {self.decode_attention!r}")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_cache_hit_tokens: int = 0
    prompt_cache_miss_tokens: int = 0
    compute_seconds: float = 0.0  # this request's share of the engine's busy time
    queue_seconds: float = 0.0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


@dataclass
class StepOutput:
    request_id: str
    text: str  # new text since the last output (empty without a tokenizer)
    token_ids: list[int]  # new tokens since the last output
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    usage: Usage | None = None  # on the finished output
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token_ids entry, with params.logprobs
    # with params.prompt_logprobs, on the first output: one per prompt token, the first None (nothing before it)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logits: list[torch.Tensor] = field(default_factory=list)  # with EngineConfig.record_logits
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token_ids entry, with params.logprobs
    eos: TokenLogprob | None = None  # the end-of-sequence token it stopped at (not in token_ids), with logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs


class Sequence:
    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, max_tokens: int,
                 stream: TextStream | None, adapter: int = 0) -> None:
        self.id, self.prompt, self.params, self.max_tokens = rid, prompt, params, max_tokens
        self.adapter = adapter  # serve.adapters: 0 is the base model
        self.tokens = list(prompt)  # committed tokens: prompt + output
        self.gen = make_generator(params.seed)
        self.stream = stream
        self.table: list[int] = []  # block table
        self.hashes: list[bytes] = []  # chained hash of each registered full block
        self.reserved = 0  # blocks promised but not yet allocated
        self.n_cached = 0  # main-cache positions written and final
        self.n_mtp = 0  # MTP positions written and final
        self.compute_from = 0  # next main position to run during prefill
        self.h_tail: torch.Tensor | None = None  # main hidden states at positions n_mtp .. not yet fed to MTP
        self.draft: int | None = None
        self.draft_probs: torch.Tensor | None = None
        self.recent: deque[int] = deque(maxlen=SPEC_WINDOW)  # 1 per accepted draft, 0 per rejected
        self.pause_until = 0  # engine step from which drafting resumes
        self.backoff = SPEC_BACKOFF[0]
        self.usage = Usage(prompt_tokens=len(prompt))
        self.submitted = time.perf_counter()
        self.new_ids: list[int] = []
        self.new_text = ""
        self.new_logprobs: list[TokenLogprob] = []
        self.eos: TokenLogprob | None = None
        # prompt_lps[p]: log-probability of prompt token p (top MAX_LOGPROBS), with params.prompt_logprobs
        self.prompt_lps: list[TokenLogprob | None] = [None]
        self.lps_stored = 0  # leading blocks whose prompt log-probabilities are in the engine's store
        self.new_prompt_lps: list[TokenLogprob | None] | None = None
        self.prompt_hashes: list[bytes] | None = None  # chained hashes of the full prompt blocks, when asked
        self.finish_reason: str | None = None
        self.logits: list[torch.Tensor] = []

    @property
    def n_output(self) -> int:
        return len(self.tokens) - len(self.prompt)


class Engine:
    """Continuous-batching inference over a paged latent KV cache (see the module docstring)."""

    def __init__(self, model: DeepseekV3LM, codec: Codec | None = None,
                 config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.codec = codec  # None: token ids in and out, no text
        self.config = cfg = config or EngineConfig()
        mcfg = model.config
        self.max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
        self.adapters = getattr(model, "row_adapters", None)  # serve.adapters, when attached
        # the MTP module carries no adapter: an adapted row's drafts come from the base's MTP module over the
        # adapted model's hidden states. They are proposals only (verification keeps each row's output its
        # adapter's), and a row whose drafts stop paying pauses drafting like any other
        self.spec = cfg.speculative and len(model.model.mtp) > 0
        param = next(model.parameters())
        dtype = cfg.cache_dtype or param.dtype
        self.layout = CacheLayout(n_layers=mcfg.num_hidden_layers + int(self.spec), width=entry_width(mcfg),
                                  dtype=dtype)
        namespace = f"{mcfg.to_dict()}|{self.layout}|{_weights_fingerprint(model)}"
        self._namespace, self.weights_version = namespace, 0
        self.pool = BlockPool(self.layout, block_size=cfg.block_size, max_bytes=cfg.cache_memory,
                              device=param.device, spill_dir=cfg.spill_dir, spill_max_bytes=cfg.spill_max_bytes,
                              namespace=namespace)
        self.runner = ModelRunner(model, self.pool, cfg.decode_attention, with_mtp=self.spec)
        self.device = param.device
        self.eos_ids: set[int] = set(codec.eos_ids) if codec is not None else set()
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # submitted, not yet admitted (the bounded queue)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.counters = dict(requests=0, finished=0, aborted=0, prompt_tokens=0, completion_tokens=0,
                             cache_hit_tokens=0, cache_miss_tokens=0, draft_tokens=0, accepted_draft_tokens=0,
                             draft_pauses=0,
                             steps=0, busy_seconds=0.0)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) for tokens per second
        self._done: list[Sequence] = []  # finished this step, reported by _flush_outputs
        self._last_finished: dict[str, Sequence] = {}
        self._block_lps: OrderedDict[bytes, list[TokenLogprob]] = OrderedDict()  # block hash -> its tokens'

    # ----- sizes --------------------------------------------------------------------------------------
    @property
    def cache_bytes_per_token(self) -> int:
        """Cache bytes one token of context occupies in the main model: ``(r_kv + d_r) * L * dtype size``
        for MLA (the MTP block's row, when drafting, adds one layer's worth)."""
        return cache_bytes_per_token(self.model.config, self.layout.dtype)

    def weights_updated(self) -> None:
        """The model's weights changed in place (a training step on the same modules: GRPO's rollouts come
        from the policy being trained, with no copy and no round trip through disk). Cached prefix blocks
        were computed by the old weights, so none is found again: the pool's index and LRU are emptied and
        the hash chain gets a new root (a spill directory's old files never match). Call between steps,
        with no request in flight."""
        if self.has_work():
            raise RuntimeError("weights_updated() with requests in flight; finish or abort them first")
        self.weights_version += 1
        self._block_lps.clear()
        self.pool.forget_prefixes(f"{self._namespace}|v{self.weights_version}")

    # ----- requests (thread-safe) ---------------------------------------------------------------------
    def submit(self, prompt: list[int] | str, params: SamplingParams | None = None,
               request_id: str | None = None, adapter: int = 0) -> str:
        """Validate and queue a request; returns its id. Raises RequestError (cannot be served as asked) or
        QueueFullError (try later)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.codec is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids", param="prompt")
            prompt = self.codec.encode(prompt)
        prompt = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        n, ctx = len(prompt), self.max_model_len
        if n >= ctx and not (n == ctx and params.max_tokens == 0):
            raise RequestError(f"this model's maximum context length is {ctx} tokens, but the prompt has {n} "
                               f"tokens (no room for any output)", param="prompt", code="context_length_exceeded")
        max_tokens = params.max_tokens if params.max_tokens is not None else ctx - n
        if n + max_tokens > ctx:
            raise RequestError(f"this model's maximum context length is {ctx} tokens; the prompt ({n}) plus "
                               f"max_tokens ({max_tokens}) asks for {n + max_tokens}", param="max_tokens",
                               code="context_length_exceeded")
        need = self._blocks_needed(n, max_tokens)
        if need > self.pool.n_blocks:
            raise RequestError(
                f"the request needs {need} KV cache blocks ({n} + {max_tokens} tokens at "
                f"{self.layout.bytes_per_token} bytes each) but the cache holds {self.pool.n_blocks} "
                f"({self.pool.total_bytes / 2**20:.1f} MiB); lower max_tokens or give the server more cache memory",
                param="max_tokens", code="cache_capacity_exceeded")
        stream = TextStream(self.codec.decode, params.stop) if self.codec is not None else None
        with self._lock:
            if self._pending >= self.config.max_queue:
                raise QueueFullError(f"the request queue is full ({self.config.max_queue} waiting); retry later")
            self._pending += 1
            rid = request_id or f"req-{next(self._ids)}"
        n_adapters = len(self.adapters.names) if self.adapters is not None else 0
        if not 0 <= adapter <= n_adapters:
            raise RequestError(f"no adapter {adapter} (this engine has {n_adapters})", param="model")
        self._inbox.put(("add", Sequence(rid, prompt, params, max_tokens, stream, adapter)))
        return rid

    def abort_all(self, reason: str = "error") -> list[StepOutput]:
        """Finish every sequence now (after a failed step, or at shutdown); the pool gets all blocks back."""
        self._drain_inbox()
        for seq in list(self.waiting) + self.prefilling + self.running:
            if seq in self.waiting:
                with self._lock:
                    self._pending -= 1
            self._finish(seq, reason)
        self.waiting.clear()
        return self._flush_outputs()

    def abort(self, request_id: str) -> None:
        """Stop a request (e.g. its client went away); its blocks are freed at the next step."""
        self._inbox.put(("abort", request_id))

    def queue_length(self) -> int:
        return self._pending

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or not self._inbox.empty())

    def _blocks_needed(self, n_prompt: int, max_tokens: int) -> int:
        # the last step writes at most two slots past the committed tokens (pending + draft, and MTP's shift)
        return -(-(n_prompt + max_tokens + 2) // self.config.block_size)

    # ----- the step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        self._drain_inbox()
        self._admit()
        budget = self.config.prefill_chunk
        chunks: list[tuple[Sequence, int, int]] = []  # (sequence, start, end) of this step's prompt tokens
        for seq in self.prefilling:
            if budget <= 0:
                break
            end = min(len(seq.prompt), seq.compute_from + budget)
            chunks.append((seq, seq.compute_from, end))
            budget -= end - seq.compute_from
        prefilled = {seq.id for seq, _, _ in chunks}
        if chunks:
            self._prefill(chunks)
        decoding = [s for s in self.running if s.id not in prefilled]
        if decoding:
            t1 = time.perf_counter()
            if self.spec:
                self._decode_speculative(decoding)
            else:
                self._decode_plain(decoding)
            share = (time.perf_counter() - t1) / len(decoding)
            for s in decoding:
                s.usage.compute_seconds += share
        outputs = self._flush_outputs()
        self.counters["steps"] += 1
        self.counters["busy_seconds"] += time.perf_counter() - t0
        return outputs

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.waiting.append(item)
                self.counters["requests"] += 1
            else:
                self._abort_now(item)

    def _abort_now(self, rid: str) -> None:
        for group in (self.waiting, self.prefilling, self.running):
            for seq in group:
                if seq.id == rid:
                    if group is self.waiting:
                        self.waiting.remove(seq)
                        with self._lock:
                            self._pending -= 1
                    self._finish(seq, "abort")
                    return

    def _admit(self) -> None:
        bs = self.pool.block_size
        while self.waiting and len(self.prefilling) + len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            need = self._blocks_needed(len(seq.prompt), seq.max_tokens)
            if self.pool.available() < need:
                return  # first come, first served: later requests wait behind it
            if self.config.prefix_cache and self._context_in_flight(seq):
                # its next context block is being prefilled by another sequence (the choices of one
                # multiple-choice question arriving together): wait a step and share it rather than compute
                # it twice
                return
            self.waiting.popleft()
            with self._lock:
                self._pending -= 1
            self.pool.reserve(need)
            seq.reserved = need
            seq.usage.queue_seconds = time.perf_counter() - seq.submitted
            if self.config.prefix_cache:
                parent = self._root(seq)
                # at least the last prompt token is computed: its logits give the first output token
                for k in range((len(seq.prompt) - 1) // bs):
                    h = chain_hash(parent, seq.prompt[k * bs : (k + 1) * bs])
                    # a scoring request needs the block's prompt log-probabilities too, else it recomputes
                    if seq.params.prompt_logprobs is not None and h not in self._block_lps:
                        break
                    block = self.pool.lookup(h)
                    if block is None:
                        break
                    if seq.params.prompt_logprobs is not None:
                        self._block_lps.move_to_end(h)
                        lps = self._block_lps[h]
                        seq.prompt_lps.extend(lps[1:] if k == 0 else lps)
                        seq.lps_stored += 1
                    seq.table.append(block)
                    seq.hashes.append(h)
                    seq.reserved -= 1
                    parent = h
            m = len(seq.table) * bs
            seq.n_cached = m
            # MTP rows of a cached block are final up to position m-2; position m-1 needs the main hidden
            # state h_{m-1}, so its main forward is recomputed (not rewritten) when drafting
            seq.n_mtp = max(m - 1, 0) if self.spec else 0
            seq.compute_from = seq.n_mtp if self.spec else m
            if seq.params.prompt_logprobs is not None and m:
                # prompt token m is scored by the logits at m-1: recompute (not rewrite) that position
                seq.compute_from = min(seq.compute_from, m - 1)
            seq.usage.prompt_cache_hit_tokens = m
            seq.usage.prompt_cache_miss_tokens = len(seq.prompt) - m
            self.counters["cache_hit_tokens"] += m
            self.counters["cache_miss_tokens"] += len(seq.prompt) - m
            self.counters["prompt_tokens"] += len(seq.prompt)
            self.prefilling.append(seq)

    def _root(self, seq: Sequence) -> bytes:
        """The hash chain's root: the pool's for the base model, one of its own per adapter (no block computed
        under one adapter is found by another)."""
        if seq.adapter == 0:
            return self.pool.root
        return chain_hash(self.pool.root + f"adapter:{self.adapters.names[seq.adapter - 1]}".encode(),
                          [seq.adapter])

    def _prompt_hashes(self, seq: Sequence) -> list[bytes]:
        if seq.prompt_hashes is None:
            bs, parent, seq.prompt_hashes = self.pool.block_size, self._root(seq), []
            for k in range((len(seq.prompt) - 1) // bs):  # the blocks admission looks up
                parent = chain_hash(parent, seq.prompt[k * bs : (k + 1) * bs])
                seq.prompt_hashes.append(parent)
        return seq.prompt_hashes

    def _context_in_flight(self, seq: Sequence) -> bool:
        """Whether the first prompt block ``seq`` would compute is one a prefilling sequence will publish."""
        if not self.prefilling:
            return False
        scoring = seq.params.prompt_logprobs is not None
        first_miss = next((h for h in self._prompt_hashes(seq)
                           if not self.pool.contains(h) or (scoring and h not in self._block_lps)), None)
        if first_miss is None:
            return False
        for s in self.prefilling:
            if scoring and s.params.prompt_logprobs is None:
                continue  # it publishes the block but not its log-probabilities
            if first_miss in self._prompt_hashes(s)[s.lps_stored if scoring else len(s.hashes):]:
                return True
        return False

    def _ensure_slots(self, seq: Sequence, n_slots: int) -> None:
        while len(seq.table) * self.pool.block_size < n_slots:
            assert seq.reserved > 0, "a sequence outgrew its reservation"
            seq.table.append(self.pool.allocate())
            seq.reserved -= 1

    # ----- prefill ------------------------------------------------------------------------------------
    def _prefill(self, chunks: list[tuple[Sequence, int, int]]) -> None:
        """Prompt tokens start..end of each sequence, all in one forward (rows padded to the longest chunk:
        many short prompts, such as the G samples of one GRPO prompt after the prefix cache, cost one pass
        of the layers, not one each); a sequence whose prompt ends here samples its first token."""
        t0 = time.perf_counter()
        rows = []
        for seq, start, end in chunks:
            self._ensure_slots(seq, end + int(self.spec))
            rows.append(Row(seq.table, start, end - start, seq.n_cached, seq.adapter))
        width = max(r.n for r in rows)
        ids = torch.tensor([seq.prompt[start:end] + [0] * (width - end + start) for seq, start, end in chunks],
                           device=self.device)  # [B, S]; padding is neither written nor read back
        h = self.runner.main(ids, rows, prefill=True)  # [B, S, H]
        # the first token's logits of every prompt that ends here (and is not scored position by position),
        # through the head in one call
        ending = [b for b, (seq, _, end) in enumerate(chunks)
                  if end == len(seq.prompt) and seq.params.prompt_logprobs is None]
        heads = self.runner.logits(h[ending, [rows[b].n - 1 for b in ending]]) if ending else None  # [E, V]
        last_of = {b: heads[i] for i, b in enumerate(ending)}
        first: list[tuple[Sequence, torch.Tensor]] = []  # prompts that ended here: their first token's logits
        for b, (seq, start, end) in enumerate(chunks):
            last = self._after_prefill(seq, start, end, h[b, : rows[b].n], last_of.get(b))
            if last is not None:
                first.append((seq, last))
        if first:
            self.running += [s for s, _ in first]  # before committing: a first token may finish it
            self._sample_and_commit([s for s, _ in first], torch.stack([lg for _, lg in first]))
        if self.spec:
            live = [seq for seq, _, _ in chunks if seq.finish_reason is None]
            if live:
                self._run_mtp(live, prefill=True)
        share = (time.perf_counter() - t0) / len(chunks)
        for seq, _, _ in chunks:
            self._register_blocks(seq)
            if seq.params.prompt_logprobs is not None:
                self._store_prompt_lps(seq)
            seq.usage.compute_seconds += share

    def _after_prefill(self, seq: Sequence, start: int, end: int, h: torch.Tensor,
                       last: torch.Tensor | None) -> torch.Tensor | None:
        """One sequence's share of a prefill forward (h [S, H], its hidden states; ``last`` the logits [V] at
        its prompt's end, when computed for the batch): prompt log-probabilities, and at the prompt's end the
        finish for scoring only, else the logits [V] its first token is drawn from (with the batch's)."""
        n = len(seq.prompt)
        seq.n_cached, seq.compute_from = end, end
        if self.spec:
            seq.h_tail = h if seq.h_tail is None else torch.cat([seq.h_tail, h])
        if seq.params.prompt_logprobs is not None:
            logits_all = self.runner.logits(h)  # [S, V]
            last = logits_all[-1]
            # position p's logits score prompt token p+1; positions already scored (from the store) are skipped
            lo = len(seq.prompt_lps) - 1
            hi = min(end, n - 1)
            if hi > lo:
                nxt = torch.tensor(seq.prompt[lo + 1 : hi + 1])
                seq.prompt_lps += position_logprobs(logits_all[lo - start : hi - start], nxt, MAX_LOGPROBS)
        if end != n:
            return None
        self.prefilling.remove(seq)
        k = seq.params.prompt_logprobs
        if k is not None:
            seq.new_prompt_lps = [None if lp is None else TokenLogprob(lp.token, lp.logprob, lp.top[:k])
                                  for lp in seq.prompt_lps]
        if self.spec and seq.max_tokens <= 1:
            # a scoring request (lm-evaluation-harness asks max_tokens 0 or 1) finishes in this step: write
            # the prompt's MTP rows now, so its blocks are final and published for the next choice's context
            self._run_mtp([seq], prefill=True, draft=False)
        if seq.max_tokens == 0:  # scoring only: nothing is sampled
            self._finish(seq, "length")
            return None
        return last

    # ----- decode -------------------------------------------------------------------------------------
    def _decode_plain(self, seqs: list[Sequence]) -> None:
        rows = []
        for s in seqs:
            N = len(s.tokens)
            self._ensure_slots(s, N)
            rows.append(Row(s.table, N - 1, 1, N - 1, s.adapter))
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)  # [B, 1]
        logits = self.runner.logits(self.runner.main(ids, rows, prefill=False)[:, 0])  # [B, V]
        for s in seqs:
            s.n_cached = len(s.tokens)
        self._sample_and_commit(seqs, logits)
        for s in seqs:
            self._register_blocks(s)

    def _sample_and_commit(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """One token for each sequence from its row of logits [B, V]: the draws, and the log-probabilities
        where asked, batched over the rows (``sampling.sample_rows``, ``sampling.logprob_rows``)."""
        tokens, _ = sample_rows(logits, [s.params for s in seqs], [s.gen for s in seqs])
        lps = logprob_rows(logits, tokens, [s.params.logprobs for s in seqs])
        for b, s in enumerate(seqs):
            self._commit(s, [tokens[b]], [logits[b]], [lps[b]])

    def _decode_speculative(self, seqs: list[Sequence]) -> None:
        """Verify [pending, draft] for drafting sequences and decode [pending] for paused ones, in one forward."""
        rows, ids = [], []
        for s in seqs:
            N = len(s.tokens)
            self._ensure_slots(s, N + 2)
            toks = [s.tokens[-1]] if s.draft is None else [s.tokens[-1], s.draft]
            rows.append(Row(s.table, N - 1, len(toks), N - 1, s.adapter))
            ids.append(toks + [0] * (2 - len(toks)))  # padding: neither written nor read back
        width = max(r.n for r in rows)
        tokens = torch.tensor([t[:width] for t in ids], device=self.device)  # [B, 1 or 2]
        h = self.runner.main(tokens, rows, prefill=False)  # [B, S, H]
        logits = self.runner.logits(h)  # [B, S, V]
        step = self.counters["steps"]
        for b, s in enumerate(seqs):
            if s.draft is None:
                new = [sample(logits[b, 0], s.params, s.gen)[0]]
            else:
                new = verify(logits[b], [s.draft], [s.draft_probs], s.params, s.gen)
                self._count_draft(s, len(new) - 1, step)
            accepted = len(new) - 1
            s.n_cached = len(s.tokens) + accepted  # the pending token, and the draft when it stood
            fresh = h[b, : 1 + accepted]
            s.h_tail = fresh if s.h_tail is None or s.h_tail.shape[0] == 0 else torch.cat([s.h_tail, fresh])
            s.draft, s.draft_probs = None, None
            self._commit(s, new, list(logits[b, : len(new)]))
        live = [s for s in seqs if s.finish_reason is None and step + 1 >= s.pause_until]
        if live:
            self._run_mtp(live, prefill=False)
        for s in seqs:
            if s.finish_reason is None:
                self._register_blocks(s)

    def _count_draft(self, s: Sequence, accepted: int, step: int) -> None:
        s.usage.draft_tokens += 1
        s.usage.accepted_draft_tokens += accepted
        self.counters["draft_tokens"] += 1
        self.counters["accepted_draft_tokens"] += accepted
        s.recent.append(accepted)
        if len(s.recent) == s.recent.maxlen:
            if sum(s.recent) < self.config.spec_min_acceptance * len(s.recent):
                s.pause_until = step + 1 + s.backoff  # drafting costs more than it saves here: pause
                s.backoff = min(2 * s.backoff, SPEC_BACKOFF[1])
                self.counters["draft_pauses"] += 1
                s.recent.clear()
            else:
                s.backoff = SPEC_BACKOFF[0]

    def _run_mtp(self, seqs: list[Sequence], prefill: bool, draft: bool = True) -> None:
        """Feed the MTP block every position whose next token is committed, and draft from the last one."""
        rows, h_prev, nxt, spans = [], [], [], []
        for s in seqs:
            stop = min(s.n_cached, len(s.tokens) - 1)
            k = stop - s.n_mtp
            assert s.h_tail is not None and s.h_tail.shape[0] >= k
            rows.append(Row(s.table, s.n_mtp, k, s.n_mtp))
            h_prev.append(s.h_tail[:k])
            nxt.append(s.tokens[s.n_mtp + 1 : stop + 1])
            spans.append(k)
        if max(spans) == 0:
            return
        hp = pad_sequence(h_prev, batch_first=True)  # [B, S, H]
        ids = pad_sequence([torch.tensor(t, dtype=torch.long) for t in nxt], batch_first=True).to(self.device)
        out = self.runner.mtp(hp, ids, rows, prefill=prefill and len(seqs) == 1)  # [B, S, H]
        drafting = []
        for b, s in enumerate(seqs):
            k = spans[b]
            s.h_tail = s.h_tail[k:]
            s.n_mtp += k
            if draft and k and s.n_mtp == len(s.tokens) - 1:  # reached the pending token: draft the one after it
                drafting.append(b)
        if drafting:
            last = out[drafting, [spans[b] - 1 for b in drafting]]  # [D, H]
            logits = self.runner.logits(last, mtp=True)  # [D, V]
            for i, b in enumerate(drafting):
                seqs[b].draft, seqs[b].draft_probs = sample(logits[i], seqs[b].params, seqs[b].gen)

    # ----- committing tokens and finishing ------------------------------------------------------------
    def _commit(self, seq: Sequence, tokens: list[int], logits: list[torch.Tensor],
                lps: list[TokenLogprob | None] | None = None) -> None:
        """Append tokens (each drawn from its logits [V]; ``lps`` their log-probabilities when already
        computed) and finish the sequence at EOS, a stop or its length."""
        if lps is None:
            k = seq.params.logprobs
            lps = [None] * len(tokens) if k is None else logprob_rows(torch.stack(logits), tokens, [k] * len(tokens))
        for tok, lg, lp in zip(tokens, logits, lps, strict=True):
            seq.tokens.append(tok)
            if self.config.record_logits:
                seq.logits.append(lg.detach().clone())
            if (tok in self.eos_ids and not seq.params.ignore_eos) or tok in seq.params.stop_token_ids:
                seq.eos = lp
                self._finish(seq, "stop")
                return
            seq.new_ids.append(tok)
            if lp is not None:
                seq.new_logprobs.append(lp)
            if seq.stream is not None:
                seq.new_text += seq.stream.push(tok)
                if seq.stream.stopped:
                    self._finish(seq, "stop")
                    return
            if seq.n_output >= seq.max_tokens or len(seq.tokens) >= self.max_model_len:
                self._finish(seq, "length")
                return

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if reason != "error":  # after a failed step the cache content is not trusted
            self._register_blocks(seq)  # its full blocks serve the next turn of a conversation
        if seq.stream is not None and reason != "abort":
            seq.new_text += seq.stream.finish()
        self.pool.release_all(seq.table)
        self.pool.unreserve(seq.reserved)
        seq.table, seq.reserved, seq.h_tail = [], 0, None
        for group in (self.prefilling, self.running):
            if seq in group:
                group.remove(seq)
        out = len(seq.tokens) - len(seq.prompt)
        seq.usage.completion_tokens = out
        self.counters["finished"] += 1
        self.counters["aborted"] += reason == "abort"
        self.counters["completion_tokens"] += out
        self._done.append(seq)

    def _flush_outputs(self) -> list[StepOutput]:
        outs = []
        new_tokens = 0
        for seq in self.prefilling + self.running + self._done:
            if seq.finish_reason is None and not seq.new_ids and not seq.new_text and seq.new_prompt_lps is None:
                continue
            done = seq.finish_reason is not None
            outs.append(StepOutput(seq.id, seq.new_text, seq.new_ids, done, seq.finish_reason,
                                   seq.usage if done else None, seq.new_logprobs, seq.new_prompt_lps))
            new_tokens += len(seq.new_ids)
            seq.new_ids, seq.new_text, seq.new_logprobs, seq.new_prompt_lps = [], "", [], None
        if new_tokens:
            self._recent.append((time.perf_counter(), new_tokens))
        self._last_finished = {s.id: s for s in self._done}
        self._done = []
        return outs

    def _register_blocks(self, seq: Sequence) -> None:
        """Publish every block that is full and final in all layers under its chained hash."""
        if not self.config.prefix_cache:
            return
        bs = self.pool.block_size
        final = min(seq.n_cached, seq.n_mtp + 1) if self.spec else seq.n_cached
        while len(seq.hashes) < min(final // bs, len(seq.table)):
            k = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else self._root(seq)
            h = chain_hash(parent, seq.tokens[k * bs : (k + 1) * bs])
            self.pool.register(seq.table[k], h)
            seq.hashes.append(h)

    def _store_prompt_lps(self, seq: Sequence) -> None:
        """Keep the prompt log-probabilities of each published prompt block beside its hash (LRU-bounded)."""
        bs = self.pool.block_size
        while seq.lps_stored < len(seq.hashes) and (seq.lps_stored + 1) * bs <= len(seq.prompt_lps):
            k = seq.lps_stored
            lps = seq.prompt_lps[k * bs : (k + 1) * bs]
            if k == 0:
                lps = [TokenLogprob(seq.prompt[0], 0.0, [])] + lps[1:]  # placeholder: position 0 has none
            self._block_lps[seq.hashes[k]] = lps  # type: ignore[assignment]
            self._block_lps.move_to_end(seq.hashes[k])
            seq.lps_stored += 1
        while len(self._block_lps) > PROMPT_LOGPROB_BLOCKS:
            self._block_lps.popitem(last=False)

    # ----- whole generations (CLI, benchmarks, tests) -------------------------------------------------
    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list[int] | None = None) -> list[Completion]:
        """Submit all prompts, step until every one is finished, return them in order (``adapters``: each
        prompt's adapter, serve.adapters)."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        alist = adapters or [0] * len(prompts)
        ids = [self.submit(p, sp, adapter=a) for p, sp, a in zip(prompts, plist, alist, strict=True)]
        texts = {i: [] for i in ids}
        toks: dict[str, list[int]] = {i: [] for i in ids}
        lps: dict[str, list[TokenLogprob]] = {i: [] for i in ids}
        plps: dict[str, list[TokenLogprob | None] | None] = {i: None for i in ids}
        done: dict[str, Completion] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id not in texts:
                    continue
                texts[out.request_id].append(out.text)
                toks[out.request_id] += out.token_ids
                lps[out.request_id] += out.logprobs
                if out.prompt_logprobs is not None:
                    plps[out.request_id] = out.prompt_logprobs
                if out.finished:
                    rid = out.request_id
                    seq = self._last_finished[rid]
                    done[rid] = Completion(rid, "".join(texts[rid]), toks[rid], out.finish_reason or "stop",
                                           out.usage or Usage(), seq.logits, lps[rid], seq.eos, plps[rid])
        return [done[i] for i in ids]

    # ----- metrics ------------------------------------------------------------------------------------
    def stats(self, window_s: float = 10.0) -> dict[str, float]:
        now = time.perf_counter()
        while self._recent and now - self._recent[0][0] > 60:
            self._recent.popleft()
        recent = sum(n for t, n in self._recent if now - t <= window_s)
        c = self.counters
        hits, misses = c["cache_hit_tokens"], c["cache_miss_tokens"]
        return dict(c, queue_length=self._pending, running=len(self.running) + len(self.prefilling),
                    tokens_per_second=recent / window_s,
                    cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
                    acceptance_rate=(c["accepted_draft_tokens"] / c["draft_tokens"]) if c["draft_tokens"] else 0.0,
                    cache_blocks_total=self.pool.n_blocks, cache_blocks_used=self.pool.used_blocks(),
                    cache_blocks_cached=len(self.pool.lru), cache_bytes_per_token=self.cache_bytes_per_token)


def _weights_fingerprint(model: DeepseekV3LM) -> str:
    """A cheap identity of the weights, so a spill directory is never read by a different model."""
    probes = (model.model.embed_tokens.weight, model.lm_head.weight, next(model.model.layers[0].parameters()))
    with torch.no_grad():
        return ",".join(f"{float(p.detach().float().sum()):.6e}" for p in probes)
