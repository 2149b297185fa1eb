"""Choosing tokens: sampling parameters and their validation, the warped distribution (temperature, top-k,
top-p), speculative verification, and the text side of a stream (incremental detokenization, stop strings).

Speculative verification follows Leviathan et al. (arXiv 2211.17192): a drafted token d drawn from q is kept
with probability min(1, p(d) / q(d)), where p is the main model's (warped) distribution; on rejection the
replacement is drawn from norm(max(p - q, 0)). The output is then distributed exactly as sampling from p
alone. At temperature 0 both distributions are one-hot and the rule is "keep d if it is the main model's
argmax", so greedy speculative decoding reproduces greedy decoding token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from frugallm.errors import ConfigError, ResourceError

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_LOGPROBS = 20  # alternatives per position, as OpenAI's API


class RequestError(ConfigError):
    """A request the engine cannot serve as asked; ``param`` names the offending field, ``code`` is the
    OpenAI-style error code the server answers with."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class QueueFullError(ResourceError):
    """The bounded request queue is full; try again later (HTTP 503)."""


@dataclass(kw_only=True)
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: each output token's log-probability and the top k alternatives
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's (the first has none), as logprobs
    stop_token_ids: tuple[int, ...] = ()  # generation stops at these, like EOS (the token is not in the output)

    def __post_init__(self) -> None:
        def bad(param: str, allowed: str, got: object) -> RequestError:
            return RequestError(f"{param} must be {allowed}, got {got!r}", param=param)

        # max_tokens 0 scores a prompt without generating: only with prompt log-probabilities (echo)
        least = 0 if self.prompt_logprobs is not None else 1
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < least):
            raise bad("max_tokens", f"an integer >= {least}", self.max_tokens)
        if not _is_num(self.temperature) or not 0 <= self.temperature <= 2:
            raise bad("temperature", "a number in [0, 2]", self.temperature)
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an integer >= -1 (-1 or 0 turn it off)", self.top_k)
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer", self.seed)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}]", self.logprobs)
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise bad("prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}]", self.prompt_logprobs)
        self.stop_token_ids = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of token ids", self.stop_token_ids)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", f"a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN fails


class RandomStream:
    """A sequence's source of uniform draws in [0, 1): a seeded ``torch.Generator`` read in chunks of
    ``CHUNK``, so that sampling a batch costs no per-row generator call, and a sequence's draws (hence its
    tokens) are the same whichever batch it decodes in."""

    CHUNK = 64

    def __init__(self, seed: int | None) -> None:
        self.gen = torch.Generator()
        if seed is None:
            self.gen.seed()  # fresh entropy: unseeded requests differ
        else:
            self.gen.manual_seed(seed)
        self._buf: list[float] = []

    def uniform(self) -> float:
        if not self._buf:
            self._buf = torch.rand(self.CHUNK, generator=self.gen, dtype=torch.float64).tolist()[::-1]
        return self._buf.pop()


def make_generator(seed: int | None) -> RandomStream:
    return RandomStream(seed)


def warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] -> the distribution sampled from [V] (float32): temperature, then top-k, then top-p."""
    return warp_rows(logits[None], [p])[0]


def warp_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [B, V] with each row's parameters (none greedy) -> the distributions sampled from [B, V]
    (float32): temperature, then top-k, then top-p, each row by its own values, in a few batched ops."""
    B, V = logits.shape
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    x = logits.float() / temps[:, None]  # [B, V]
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    if any(ks):
        top = x.topk(max(ks), dim=-1).values  # [B, k_max], descending
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks])[:, None])  # [B, 1]
        kth = torch.where(torch.tensor(ks)[:, None] > 0, kth, float("-inf"))  # rows without top-k keep all
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)  # [B, V]
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)[:, None]  # [B, 1]
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw_rows(probs: torch.Tensor, uniforms: Sequence[float]) -> torch.Tensor:
    """One token per row of probs [B, V] by inverse transform: the first token whose cumulative probability
    exceeds u * total (``right=True``: a token of probability 0 is never drawn). -> [B] int64."""
    cdf = probs.cumsum(-1)  # [B, V]
    u = torch.tensor(uniforms, dtype=cdf.dtype)[:, None] * cdf[:, -1:]  # [B, 1]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


@dataclass
class TokenLogprob:
    """One position's log-probabilities: log-softmax of the model's logits at temperature 1, whatever the
    sampling temperature (OpenAI's and vLLM's definition, and the policy GRPO's ratio is taken over)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely tokens, most likely first


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """logits [V] (float32) -> the log-probability of ``token`` and the top ``k`` alternatives."""
    out = logprob_rows(logits[None], [token], [k])[0]
    assert out is not None
    return out


def logprob_rows(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int | None]
                 ) -> list[TokenLogprob | None]:
    """``token_logprob`` for every row of logits [B, V] whose k is not None (one log-softmax and one top-k
    for all of them); None for the others."""
    out: list[TokenLogprob | None] = [None] * len(ks)
    want = [b for b, k in enumerate(ks) if k is not None]
    if not want:
        return out
    lp = torch.log_softmax((logits if len(want) == len(ks) else logits[want]).float(), dim=-1)  # [R, V]
    chosen = lp.gather(-1, torch.tensor([tokens[b] for b in want])[:, None]).squeeze(-1).tolist()  # [R]
    k_max = max(ks[b] for b in want)  # type: ignore[type-var]
    vals, ids = lp.topk(k_max, dim=-1) if k_max else (None, None)
    for i, b in enumerate(want):
        k = ks[b]
        top = list(zip(ids[i, :k].tolist(), vals[i, :k].tolist(), strict=True)) if k else []  # type: ignore[index]
        out[b] = TokenLogprob(int(tokens[b]), chosen[i], top)
    return out


def position_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits [S, V] at S consecutive positions, tokens [S] the token that follows each -> one
    ``TokenLogprob`` per position, in one log-softmax and one top-k over the batch (prompt scoring)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [S, V]
    chosen = lp.gather(-1, tokens[:, None]).squeeze(-1).tolist()  # [S]
    if k:
        vals, ids = lp.topk(k, dim=-1)  # [S, k]
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(int(t), c, top) for t, c, top in zip(tokens.tolist(), chosen, tops, strict=True)]


def sample(logits: torch.Tensor, p: SamplingParams, rng: RandomStream
           ) -> tuple[int, torch.Tensor | None]:
    """One token from logits [V]; also the distribution it was drawn from (None when greedy)."""
    tokens, probs = sample_rows(logits[None], [p], [rng])
    return tokens[0], None if probs[0] is None else probs[0]


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], rngs: Sequence[RandomStream]
                ) -> tuple[list[int], list[torch.Tensor | None]]:
    """One token per row of logits [B, V], each row with its own parameters and random stream, in batched
    ops whatever the mix (greedy rows: one argmax; sampled rows: one warp and one draw); also each row's
    distribution (None for greedy rows). A row's token does not depend on the other rows."""
    B = logits.shape[0]
    hot = [b for b, p in enumerate(params) if not p.greedy]
    tokens = logits.argmax(-1).tolist() if len(hot) < B else [0] * B  # [B]; kept for the greedy rows
    dists: list[torch.Tensor | None] = [None] * B
    if hot:
        rows = logits if len(hot) == B else logits[hot]
        probs = warp_rows(rows, [params[b] for b in hot])  # [B_s, V]
        drawn = draw_rows(probs, [rngs[b].uniform() for b in hot]).tolist()
        for i, b in enumerate(hot):
            tokens[b], dists[b] = drawn[i], probs[i]
    return tokens, dists


def verify(main_logits: torch.Tensor, drafts: Sequence[int], draft_probs: Sequence[torch.Tensor | None],
           p: SamplingParams, rng: RandomStream) -> list[int]:
    """main_logits [k+1, V] at the pending token and each of the k drafts -> the tokens to commit: the
    accepted drafts followed by one token from the main model (the correction, or the bonus after k
    accepted drafts), so 1 .. k+1 tokens."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        if p.greedy:
            best = int(main_logits[i].argmax())
            if best != d:
                return out + [best]
        else:
            target, q = warp(main_logits[i], p), draft_probs[i]
            assert q is not None, "a sampled draft keeps its distribution"
            accept = min(1.0, float(target[d]) / max(float(q[d]), 1e-20))
            if rng.uniform() >= accept:
                residual = (target - q).clamp_min(0)
                if float(residual.sum()) <= 0:  # p == q: any draw from p is exact
                    residual = target
                return out + [int(draw_rows(residual[None], [rng.uniform()])[0])]
        out.append(d)
    return out + [sample(main_logits[len(drafts)], p, rng)[0]]


class TextStream:
    """Turns generated token ids into text deltas: decodes incrementally (holding back an incomplete UTF-8
    character) and holds back any tail that could be the start of a stop string; stops at the earliest stop
    string, which is not part of the text."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, tuple(stop)
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters of ``text`` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        # decode a short window, not the whole output: byte-level BPE decodes concatenation-wise
        before = self.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def _release(self, final: bool = False) -> str:
        if self.stop:
            look_from = max(0, self.emitted - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, look_from) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                self.text, self.stopped = self.text[:end], True
                return self._emit(end)
        hold = 0 if final else self._partial_stop_suffix()
        return self._emit(len(self.text) - hold)

    def _partial_stop_suffix(self) -> int:
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted : end], end
        return out

    def finish(self) -> str:
        """The rest of the text when the stream ends for another reason (length, EOS)."""
        if self.stopped:
            return ""
        tail = self.decode(self.ids[self.prefix_offset :])
        before = self.decode(self.ids[self.prefix_offset : self.read_offset])
        if len(tail) > len(before):
            self.text += tail[len(before) :]
        return self._release(final=True)
