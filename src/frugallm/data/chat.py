"""The one chat renderer: conversations become text (and, for training, token ids with a loss mask) the same
way for ``tune`` and ``serve``.

Where the template comes from (``template_source``), given a tokenizer directory:
    tokenizer_config.json ``chat_template``   a Jinja string, or named templates (transformers' list of
                                              ``{"name", "template"}`` or a dict name -> template), of which
                                              the one named ``default`` is used
    chat_template.jinja                       transformers' separate file, used when the config has none
    neither                                   ``DEFAULT_TEMPLATE`` below

Templates come from checkpoints, so they are rendered only in Jinja's ``ImmutableSandboxedEnvironment``:
attributes starting with ``_`` (``''.__class__``) and mutating methods (``list.append``) are refused. The
variables are transformers': ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
``raise_exception(msg)``, ``strftime_now(fmt)``, the ``tojson`` filter (non-ASCII kept), loop controls
(``break``/``continue``) and the ``{% generation %}`` block (rendered as its body).

Default template, for models trained without one (``<eos>`` is the tokenizer's end-of-sequence token):

    <|system|>\\nSYSTEM\\n<|user|>\\nUSER\\n<|assistant|>\\nANSWER<eos><|user|>\\n...<|assistant|>\\n

An assistant turn ends with EOS and nothing after it, so training teaches the model to stop with EOS, and the
assistant span the loss falls on is exactly ``ANSWER<eos>``. Serving stops at the tokenizer's EOS ids; the
``<|user|>``/``<|system|>`` markers (``DEFAULT_CHAT_STOPS``) stay as stop strings for models trained before
assistant turns ended with EOS.

The loss mask (``render_with_mask``) works for any template: for the i-th message, an assistant turn, the
rendering of ``messages[:i]`` with the generation prompt must be a prefix of the rendering of
``messages[:i+1]``, which must be a prefix of the full rendering; the characters between the two are that
turn's span (end-of-turn tokens included, as the template writes them). The full text is tokenized once with
offsets and a token is trained when it starts inside a span. Templates that re-render history differently
(some strip earlier reasoning) fail the prefix check and the conversation is refused
(``ChatTemplateError``, reason ``template_not_prefix``) rather than masked wrongly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from frugallm.errors import CheckpointError, DataError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
DEFAULT_CHAT_STOPS = ("<|user|>", "<|system|>")
TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant", "tool", "developer")  # the OpenAI chat roles
TrainOn = Literal["assistant", "last", "all"]
TRAIN_ON = ("assistant", "last", "all")


class ChatTemplateError(DataError):
    """A conversation the template refuses or cannot render; ``reason`` is a short key for counting."""

    def __init__(self, message: str, reason: str = "template_error") -> None:
        super().__init__(message)
        self.reason = reason


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


def template_source(directory: str | Path, config: dict[str, Any] | None = None) -> str | None:
    """The Jinja source of the chat template in a tokenizer directory, or None (use the default)."""
    directory = Path(directory)
    template = (_read_config(directory) if config is None else config).get("chat_template")
    if template is None and (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    if isinstance(template, list):  # transformers' serialised form of named templates
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):
        if "default" not in template:
            raise CheckpointError(f"{directory}: chat_template has named templates ({', '.join(map(str, template))}) "
                                  f"but none named 'default'")
        template = template["default"]
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{directory}: chat_template must be a Jinja string, got {type(template).__name__}")
    return template


def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers' own masking;
        spans here come from prefix rendering, so the block renders as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"chat template: {message}", reason="template_refused")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # trim_blocks/lstrip_blocks as transformers sets them: templates are written for that whitespace
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled, sandboxed chat template with the tokenizer's BOS and EOS text."""

    def __init__(self, source: str | None = None, *, bos_token: str | None = None,
                 eos_token: str | None = None) -> None:
        from jinja2 import TemplateError

        self.is_default = source is None
        self.source = DEFAULT_TEMPLATE if source is None else source
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        try:
            self._compiled = _environment().from_string(self.source)
        except TemplateError as e:
            raise CheckpointError(f"chat_template does not compile: {e}") from None

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatTemplate:
        """The template of a tokenizer directory (run or HF), with its config's ``bos_token``/``eos_token``."""
        from frugallm.data.tokenizer import EOT_NAMES, load_tokenizer

        directory = Path(directory)
        cfg = _read_config(directory)
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        if eos is None and (directory / "tokenizer.json").is_file():
            tok = load_tokenizer(directory)
            eos = next((n for n in EOT_NAMES if tok.token_to_id(n) is not None), None)
        return cls(template_source(directory, cfg), bos_token=bos, eos_token=eos)

    @property
    def stops(self) -> tuple[str, ...]:
        """Stop strings a chat request gets besides the EOS ids: the default template's turn markers."""
        return DEFAULT_CHAT_STOPS if self.is_default else ()

    def render(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
               **variables: Any) -> str:
        """The text of ``messages``; with ``add_generation_prompt`` it ends where the assistant speaks.
        ``variables`` (``tools``, ...) are passed to the template as transformers passes them."""
        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **variables)
        except ChatTemplateError:
            raise
        except Exception as e:  # SecurityError, a template failing on unusual messages: the conversation's fault
            raise ChatTemplateError(f"the chat template could not render these messages: {e}") from None

    def assistant_spans(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The full text and each assistant message's ``(start, end)`` characters in it, in order."""
        if self.is_default and not self.eos_token:
            raise ChatTemplateError("the default chat template ends assistant turns with EOS, and this tokenizer "
                                    "names none (set eos_token in tokenizer_config.json)", reason="no_eos_token")
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise ChatTemplateError(f"the chat template does not render message {i} as a continuation of "
                                        f"the ones before it, so its loss mask cannot be found",
                                        reason="template_not_prefix")
            spans.append((len(before), len(through)))
        return full, spans

    def write(self, directory: str | Path) -> Path:
        """Record this template in ``directory/tokenizer_config.json`` (created or updated, atomically), so a
        run renders conversations for serving exactly as it did for training. Returns the config path."""
        from frugallm import fsio

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = _read_config(directory)
        cfg["chat_template"] = self.source
        for key, value in (("eos_token", self.eos_token), ("bos_token", self.bos_token)):
            if value and not _token_text(cfg.get(key)):
                cfg[key] = value
        path = directory / "tokenizer_config.json"
        fsio.write_text(path, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return path


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):  # {"content": "<|endoftext|>", ...} as transformers writes AddedToken
        v = v.get("content")
    return v if isinstance(v, str) and v else None


# ----- token ids with a loss mask ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Rendered:
    text: str
    ids: list[int]
    mask: list[bool]  # True where the token is trained
    offsets: list[tuple[int, int]]  # each token's characters in text
    spans: list[tuple[int, int]]  # trained character spans of text

    @property
    def trained(self) -> int:
        return sum(self.mask)


def tokenize_spans(text: str, spans: Sequence[tuple[int, int]], tokenizer: Tokenizer) -> Rendered:
    """Tokenize ``text`` once; a token is trained when its first character lies in one of ``spans``. Tokens
    that start before a span and run into it (a BPE merge across the boundary) stay untrained, so the mask
    never reaches into the prompt."""
    enc = tokenizer.encode(text, add_special_tokens=False)
    mask, k = [], 0
    for start, _ in enc.offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(k < len(spans) and spans[k][0] <= start < spans[k][1])
    return Rendered(text=text, ids=list(enc.ids), mask=mask, offsets=list(enc.offsets), spans=list(spans))


def render_with_mask(messages: Sequence[dict[str, Any]], tokenizer: Tokenizer, template: ChatTemplate, *,
                     train_on: TrainOn = "assistant") -> Rendered:
    """Token ids of the rendered conversation and the loss mask: every assistant turn (``assistant``), only the
    last one (``last``) or every token (``all``). Raises ``ChatTemplateError`` for conversations the template
    cannot render or mask."""
    if train_on not in TRAIN_ON:
        raise DataError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    text, spans = template.assistant_spans(messages)
    if train_on == "last":
        spans = spans[-1:]
    elif train_on == "all":
        spans = [(0, len(text))]
    return tokenize_spans(text, spans, tokenizer)


def render_completion(prompt: str, completion: str, tokenizer: Tokenizer, eos_token: str) -> Rendered:
    """A ``prompt``/``completion`` row: the two texts joined as they are (no template) and EOS; the completion
    and EOS are trained."""
    return tokenize_spans(prompt + completion + eos_token, [(len(prompt), len(prompt) + len(completion)
                                                             + len(eos_token))], tokenizer)


def render_text(text: str, tokenizer: Tokenizer, eos_token: str) -> Rendered:
    """A plain ``text`` row (continued pretraining): every token trained, EOS after it."""
    full = text + eos_token
    return tokenize_spans(full, [(0, len(full))], tokenizer)
