"""Log-probabilities in OpenAI's two response formats, and the request fields that ask for them.

Completions (the legacy format lm-evaluation-harness reads)::

    "logprobs": {"tokens": [str], "token_logprobs": [float | null], "top_logprobs": [{str: float} | null],
                 "text_offset": [int]}

one entry per token: with ``echo`` the prompt's tokens first (the very first has no log-probability: null,
as OpenAI and vLLM answer), then the generated ones. ``text_offset`` is each token's character offset in the
choice's text (the echoed prompt included). Token strings are each token decoded alone, special tokens kept (or ``token_id:ID`` with vLLM's
``return_tokens_as_token_ids``).

Chat::

    "logprobs": {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

Values are log-softmax of the logits at temperature 1 (``sampling.token_logprob``), whatever the sampling
temperature.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from frugallm.serve.sampling import MAX_LOGPROBS, TokenLogprob


class TokenText:
    """Each token id's text as a logprobs entry shows it (decoded alone, special tokens kept)."""

    def __init__(self, tokenizer: Any) -> None:
        self.text = lru_cache(maxsize=1 << 16)(lambda i: tokenizer.decode([i], skip_special_tokens=False))


class TokenIds(TokenText):
    """vLLM's ``return_tokens_as_token_ids``: each token as ``token_id:ID`` (text that does not decode alone,
    such as part of a UTF-8 character, stays identifiable)."""

    def __init__(self) -> None:
        self.text = lambda i: f"token_id:{i}"


def completion_logprobs(tt: TokenText, lps: list[TokenLogprob | None], offset: int = 0) -> dict[str, Any]:
    """The legacy ``logprobs`` object for consecutive tokens whose text starts at character ``offset``."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        if lp is None:  # the first prompt token: nothing before it to predict it from
            continue
        s = tt.text(lp.token)
        tokens.append(s)
        values.append(lp.logprob)
        tops.append({tt.text(t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def echoed_logprobs(tt: TokenText, prompt: list[int], prompt_lps: list[TokenLogprob | None],
                    out_lps: list[TokenLogprob]) -> dict[str, Any]:
    """``echo``: the prompt's tokens (the first with null log-probability and top) then the generated ones."""
    first = tt.text(prompt[0])
    rest = completion_logprobs(tt, list(prompt_lps[1:]) + list(out_lps), offset=len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


def chat_logprobs(tt: TokenText, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: int, value: float) -> dict[str, Any]:
        s = tt.text(token)
        return {"token": s, "logprob": value, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}


def requested_logprobs(body: dict[str, Any], chat: bool, bad: Any) -> int | None:
    """The k the request asks for (None: no log-probabilities). ``bad(message, param)`` raises the 400."""
    if chat:
        on = body.get("logprobs")
        if on is not None and not isinstance(on, bool):
            raise bad("logprobs must be a boolean on chat completions (top_logprobs sets k)", "logprobs")
        k = body.get("top_logprobs")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
            raise bad(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {k!r}", "top_logprobs")
        if k is not None and not on:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        return (k or 0) if on else None
    k = body.get("logprobs")
    if k is None:
        return None
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS:
        raise bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {k!r}", "logprobs")
    return k
