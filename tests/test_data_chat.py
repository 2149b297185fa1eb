"""The one chat renderer: default and Jinja templates (ChatML, DeepSeek-V3 style) written here, the loss mask
against the assistant spans, the sandbox, and the template written into a run directory."""

from __future__ import annotations

import json

import pytest

from frugallm.data.chat import (
    DEFAULT_CHAT_STOPS,
    ChatTemplate,
    ChatTemplateError,
    render_completion,
    render_text,
    render_with_mask,
    template_source,
)
from frugallm.data.tokenizer import train_tokenizer
from frugallm.errors import CheckpointError

EOS = "<|endoftext|>"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DS_EOS = "<｜end▁of▁sentence｜>"
DEEPSEEK = (  # the shape of DeepSeek-V3's template: system first, user/assistant markers, EOS after answers
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
SPECIALS = [EOS, "<|im_start|>", "<|im_end|>", "<｜begin▁of▁sentence｜>", DS_EOS, "<｜User｜>", "<｜Assistant｜>"]
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What does MLA cache?"},
    {"role": "assistant", "content": "A compressed latent per token."},
    {"role": "user", "content": "And MTP?"},
    {"role": "assistant", "content": "It drafts the next tokens for speculative decoding."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for m in CONVERSATION] * 20 + ["system user assistant answer question"] * 10
    t = train_tokenizer(texts, 400)
    t.add_special_tokens(SPECIALS)
    return t


def trained_text(r) -> list[str]:
    """The rendered text of each maximal run of trained tokens, read back from the tokenizer's offsets."""
    runs, cur = [], ""
    for (s, e), m in zip(r.offsets, r.mask, strict=True):
        if m:
            cur += r.text[s:e]
        elif cur:
            runs.append(cur)
            cur = ""
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name, template, end", [
    ("default", ChatTemplate(eos_token=EOS), EOS),
    ("chatml", ChatTemplate(CHATML, eos_token="<|im_end|>"), "<|im_end|>\n"),
    ("deepseek", ChatTemplate(DEEPSEEK, bos_token="<｜begin▁of▁sentence｜>", eos_token=DS_EOS), DS_EOS),
])
def test_mask_is_the_assistant_spans(tok, name, template, end) -> None:
    r = render_with_mask(CONVERSATION, tok, template)
    assert trained_text(r) == [a + end for a in ANSWERS]  # the answers, end-of-turn included, nothing else
    assert [r.text[s:e] for s, e in r.spans] == [a + end for a in ANSWERS]
    assert r.ids == tok.encode(r.text, add_special_tokens=False).ids
    eos_id = tok.token_to_id(end.strip())
    assert sum(m for i, m in zip(r.ids, r.mask, strict=True) if i == eos_id) == len(ANSWERS)  # EOS inside the mask
    prompt = template.render(CONVERSATION[:-1], add_generation_prompt=True)
    assert r.text.startswith(prompt)  # serving's prompt is training's text up to the answer


def test_default_template_text_and_stops() -> None:
    t = ChatTemplate(eos_token=EOS)
    assert t.render(CONVERSATION[:3], add_generation_prompt=True) == (
        "<|system|>\nYou answer in one line.\n<|user|>\nWhat does MLA cache?\n<|assistant|>\n"
        f"A compressed latent per token.{EOS}<|assistant|>\n")
    assert t.stops == DEFAULT_CHAT_STOPS and ChatTemplate(CHATML).stops == ()


def test_train_on_last_and_all(tok) -> None:
    t = ChatTemplate(eos_token=EOS)
    last = render_with_mask(CONVERSATION, tok, t, train_on="last")
    assert trained_text(last) == [ANSWERS[-1] + EOS]
    every = render_with_mask(CONVERSATION, tok, t, train_on="all")
    assert all(every.mask) and every.ids == last.ids
    with pytest.raises(Exception, match="train_on"):
        render_with_mask(CONVERSATION, tok, t, train_on="first")  # type: ignore[arg-type]


def test_completion_and_text_rows(tok) -> None:
    r = render_completion("Q: what is MLA?\nA:", " a latent cache", tok, EOS)
    assert trained_text(r) == [" a latent cache" + EOS]
    assert r.text == "Q: what is MLA?\nA: a latent cache" + EOS
    t = render_text("speculative decoding", tok, EOS)
    assert all(t.mask) and t.text.endswith(EOS) and t.trained == len(t.ids)


def test_template_that_rewrites_history_is_refused(tok) -> None:
    # drops every assistant turn but the last, as templates that strip earlier reasoning do
    strips = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
              "[{{ m['role'] }}]{{ m['content'] }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}[assistant]{% endif %}")
    with pytest.raises(ChatTemplateError) as e:
        render_with_mask(CONVERSATION, tok, ChatTemplate(strips))
    assert e.value.reason == "template_not_prefix"


def test_raise_exception_and_default_without_eos(tok) -> None:
    with pytest.raises(ChatTemplateError, match="unknown role tool") as e:
        ChatTemplate(DEEPSEEK).render([{"role": "tool", "content": "x"}])
    assert e.value.reason == "template_refused"
    with pytest.raises(ChatTemplateError) as e:
        render_with_mask(CONVERSATION, tok, ChatTemplate())
    assert e.value.reason == "no_eos_token"


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ messages.append(1) }}",
    "{{ raise_exception.__globals__ }}x{{ raise_exception.__globals__['json'] }}",
])
def test_sandbox_refuses_python_internals(attack) -> None:
    with pytest.raises(ChatTemplateError, match="unsafe|not safely callable|undefined"):
        ChatTemplate(attack).render([{"role": "user", "content": "hi"}])


def test_template_sources(tmp_path) -> None:
    assert template_source(tmp_path) is None
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert template_source(tmp_path) == CHATML
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "t"},
                                                 {"name": "default", "template": "d"}]}))
    assert template_source(tmp_path) == "d"
    cfg.write_text(json.dumps({"chat_template": {"tool_use": "t"}}))
    with pytest.raises(CheckpointError, match="none named 'default'"):
        template_source(tmp_path)
    cfg.write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(CheckpointError, match="Jinja string"):
        template_source(tmp_path)
    with pytest.raises(CheckpointError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_written_template_renders_alike(tmp_path, tok) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "model_max_length": 512}))
    tok.save(str(run / "tokenizer.json"))
    ChatTemplate(eos_token=EOS).write(run)
    cfg = json.loads((run / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 512 and "{% for message in messages %}" in cfg["chat_template"]
    reread = ChatTemplate.from_dir(run)
    assert not reread.is_default  # now the run's own template, which serving reads too
    assert reread.render(CONVERSATION) == ChatTemplate(eos_token=EOS).render(CONVERSATION)
    assert not list(run.glob("*.tmp"))


def test_renders_as_transformers(tok) -> None:
    """Peer: transformers' apply_chat_template renders the same text and marks the same assistant tokens."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    ours = render_with_mask(CONVERSATION, tok, ChatTemplate(CHATML, eos_token="<|im_end|>"))
    assert hf.apply_chat_template(CONVERSATION, chat_template=CHATML, tokenize=False) == ours.text
    out = hf.apply_chat_template(CONVERSATION, chat_template=CHATML, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert out["input_ids"] == ours.ids
    assert [bool(m) for m in out["assistant_masks"]] == ours.mask
