"""The end-of-text token, found once (``data.tokenizer.end_of_text``) for packing and for serving: in the tokenizer
we train, and in Hugging Face tokenizer.json files with the DeepSeek, Llama and ChatML specials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from frugallm.data.tokenizer import EOT, end_of_text, save_tokenizer, special_ids, train_tokenizer
from frugallm.errors import DataError
from frugallm.serve.loading import Codec

DEEPSEEK = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA2 = ["<unk>", "<s>", "</s>"]
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ChatML turns, GPT-2's end of text
CHATML = ["<|im_start|>", "<|im_end|>"]


def hf_tokenizer(directory: Path, specials: list[str], tokenizer_config: dict | None = None) -> Path:
    """A byte-level tokenizer.json whose specials are added tokens after the 256 byte tokens, as in the
    checkpoints' files; optionally a tokenizer_config.json next to it."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    path = save_tokenizer(tok, directory / "tokenizer.json")
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def test_the_tokenizer_we_train_ends_with_its_own_token(tmp_path) -> None:
    tok = train_tokenizer(["a small corpus, a small vocabulary"] * 8, vocab_size=300)
    path = save_tokenizer(tok, tmp_path / "tokenizer.json")
    assert end_of_text(tok) == EOT
    assert special_ids(tok, path) == (0, 1)  # EOT and PAD come first
    assert Codec.from_dir(tmp_path).eos_ids == {0}


@pytest.mark.parametrize("specials, config, expected", [
    (DEEPSEEK, None, "<｜end▁of▁sentence｜>"),
    (LLAMA3, None, "<|end_of_text|>"),
    (LLAMA3, {"eos_token": "<|eot_id|>"}, "<|eot_id|>"),  # an instruct model ends its turn
    (LLAMA2, None, "</s>"),
    (QWEN, None, "<|endoftext|>"),  # preferred to the end of turn
    (QWEN, {"eos_token": {"content": "<|im_end|>", "special": True}}, "<|im_end|>"),  # AddedToken form
    (CHATML, None, "<|im_end|>"),
    (DEEPSEEK, {"eos_token": "<|not_in_this_tokenizer|>"}, "<｜end▁of▁sentence｜>"),
], ids=["deepseek", "llama3", "llama3-instruct", "llama2", "qwen", "qwen-instruct", "chatml", "stale-config"])
def test_hf_tokenizers_resolve_the_same_end_for_packing_and_serving(tmp_path, specials, config, expected) -> None:
    path = hf_tokenizer(tmp_path, specials, config)
    tok = Tokenizer.from_file(str(path))
    eos_id = tok.token_to_id(expected)
    assert eos_id >= 256
    assert special_ids(tok, path)[0] == eos_id
    codec = Codec.from_dir(tmp_path)
    assert codec.eos_ids == {eos_id}
    assert codec.eos_token == expected


def test_a_tokenizer_without_an_end_of_text(tmp_path) -> None:
    path = hf_tokenizer(tmp_path, ["<s>"])
    tok = Tokenizer.from_file(str(path))
    assert end_of_text(tok) is None
    with pytest.raises(DataError, match="no end-of-text token"):
        special_ids(tok, path)
    assert Codec.from_dir(tmp_path).eos_ids == set()
    # a model directory's generation_config.json may still name a special token by id
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<s>")]}))
    assert Codec.from_dir(tmp_path).eos_ids == {tok.token_to_id("<s>")}
