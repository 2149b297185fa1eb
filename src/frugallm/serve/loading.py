"""What serving loads: a model (a training run directory or a Hugging Face DeepSeek-V3 directory, nothing
else) and its tokenizer, wrapped as a ``Codec`` that encodes, decodes, knows the end-of-sequence tokens and
renders chat messages.

Where things are looked for, given PATH:
    model       ``frugallm.rundir``: PATH/model (a run's export), PATH (an HF directory), else the run's newest
                checkpoint
    tokenizer   tokenizer.json in the model directory, else in PATH
    chat        ``chat_template`` in tokenizer_config.json or chat_template.jinja (Jinja, as transformers
                renders it), else the default template; ``frugallm.data.chat`` renders it, as for training
    EOS         the tokenizer's end of text as packing finds it (``data.tokenizer.end_of_text``: tokenizer_config.json
                ``eos_token``, else a token named in ``EOT_NAMES``); else generation_config.json ``eos_token_id``
                when that id is a special token of the tokenizer

Default chat template (for models trained without one): see ``frugallm.data.chat``; an assistant turn ends with
EOS, and generation also stops at the next ``<|user|>`` or ``<|system|>`` marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from frugallm.data.chat import ChatTemplate, ChatTemplateError, template_source
from frugallm.data.tokenizer import config_token, end_of_text
from frugallm.errors import CheckpointError
from frugallm.model.transformer import DeepseekV3LM
from frugallm.rundir import load_model
from frugallm.serve.sampling import RequestError

ROLES = ("system", "user", "assistant", "tool", "developer")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


class Codec:
    """Tokenizer + end-of-sequence ids + chat template."""

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str | None = None, bos_token: str | None = None,
                 eos_ids: set[int] | None = None, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_ids = set(eos_ids or ())
        if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            self.eos_ids.add(tokenizer.token_to_id(eos_token))
        self.chat_template = chat_template
        self._compiled = None

    @classmethod
    def from_dir(cls, *dirs: Path) -> Codec:
        tok_file = next((d / "tokenizer.json" for d in dirs if (d / "tokenizer.json").is_file()), None)
        if tok_file is None:
            raise CheckpointError(f"no tokenizer.json in {' or '.join(str(d) for d in dirs)}")
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises its own exception type
            raise CheckpointError(f"{tok_file}: not a readable tokenizers file ({e})") from None
        tcfg = _read_json(tok_file.parent / "tokenizer_config.json")
        configured = config_token(tcfg, "eos_token")
        eos, bos = end_of_text(tokenizer, configured) or configured, config_token(tcfg, "bos_token")
        eos_ids: set[int] = set()
        if eos is None:
            special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
            gen = _read_json(tok_file.parent / "generation_config.json")
            ids = gen.get("eos_token_id")
            for i in ids if isinstance(ids, list) else [ids]:
                if isinstance(i, int) and i in special:
                    eos_ids.add(i)
        return cls(tokenizer, eos_token=eos, bos_token=bos, eos_ids=eos_ids,
                   chat_template=template_source(tok_file.parent, tcfg))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ----- chat: rendered by frugallm.data.chat, the renderer training uses -----------------------------
    @property
    def chat_stops(self) -> tuple[str, ...]:
        """Stop strings a chat request gets besides the EOS ids: the default template's turn markers."""
        return self._chat().stops

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for a list of ``{"role", "content"}`` messages, ending where the assistant speaks."""
        try:
            return self._chat().render(messages, add_generation_prompt=True)
        except ChatTemplateError as e:  # a template failing on these messages is the request's problem
            raise RequestError(str(e), param="messages") from None

    def _chat(self) -> ChatTemplate:
        if self._compiled is None:
            self._compiled = ChatTemplate(self.chat_template, bos_token=self.bos_token, eos_token=self.eos_token)
        return self._compiled


def load_for_serving(path: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[DeepseekV3LM, Codec]:
    """A run directory or a Hugging Face DeepSeek-V3 directory (``frugallm.rundir``: the run's export, else its
    newest checkpoint) -> (model in eval mode, codec)."""
    model, source = load_model(path, device=device, dtype=dtype)
    codec = Codec.from_dir(source.path, source.root)
    if codec.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"tokenizer.json has {codec.vocab_size} tokens but the model's vocab_size is "
                              f"{model.config.vocab_size}")
    return model.eval(), codec
