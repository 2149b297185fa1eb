"""Byte-level BPE: train one with Hugging Face ``tokenizers``, or load an existing ``tokenizer.json``.

Byte-level means the base alphabet is the 256 byte values (GPT-2's printable byte mapping), so every string
encodes without an unknown token and ``decode(encode(x)) == x`` exactly. Two specials come first, so they get
ids 0 and 1 in a trained tokenizer:

    <|endoftext|>   joins documents in the packed stream (EOT)
    <|pad|>         pads batches at serving time; never appears in training data

An existing tokenizer (e.g. a DeepSeek checkpoint directory's ``tokenizer.json``) keeps its own specials; its
end-of-text (``end_of_text``, for packing and serving alike) is ``tokenizer_config.json``'s ``eos_token`` when the
tokenizer has that token, else the first of ``EOT_NAMES`` it has.

When packing, specials written *inside* a document (a web page quoting ``<|endoftext|>``) are encoded as plain
text (``encode_special_tokens``), so document text can never forge a document boundary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from frugallm import fsio
from frugallm.errors import ConfigError, DataError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOT, PAD)
# end-of-text names in tokenizers we may be given, in order of preference: ours (also GPT-2's and Qwen's),
# DeepSeek's, Llama 3's, Llama 2's and Mistral's, Gemma's, ChatML's end of turn, other
EOT_NAMES = (EOT, "<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eos|>")
PAD_NAMES = (PAD, "<｜▁pad▁｜>", "<pad>", "<|finetune_right_pad_id|>")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, progress: bool = False,
                    length: int | None = None) -> Tokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (specials included) on ``texts``. The result
    can be smaller when the text has too few distinct pairs occurring at least twice."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                          f"specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would be invented text and break the exact round trip
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=progress)
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/tokenizer.json`` for a (checkpoint) directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer {str(path)!r} not found (expected a tokenizer.json or a directory with one)")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise DataError(f"tokenizer {str(p)!r} could not be read: {e}") from e


def vocab_size(tok: Tokenizer) -> int:
    """Ids run 0..size-1; a checkpoint tokenizer may have added tokens past the base vocabulary, so take the
    largest id rather than trusting ``get_vocab_size``."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def config_token(config: dict, key: str) -> str | None:
    """A token named in tokenizer_config.json (``config``): a string, or ``{"content": ...}`` as transformers
    writes an AddedToken."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _config_token(path: Path, key: str) -> str | None:
    cfg = path.parent / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config_token(config, key) if isinstance(config, dict) else None


def _first_present(tok: Tokenizer, names: Iterable[str | None]) -> str | None:
    return next((n for n in names if n and tok.token_to_id(n) is not None), None)


def end_of_text(tok: Tokenizer, eos_token: str | None = None) -> str | None:
    """The end-of-text token: ``eos_token`` (tokenizer_config.json's) when the tokenizer has it, else the first
    of ``EOT_NAMES`` it has; None when it has none of them."""
    return _first_present(tok, (eos_token, *EOT_NAMES))


def special_ids(tok: Tokenizer, path: str | Path | None = None) -> tuple[int, int]:
    """``(eot_id, pad_id)``; pad falls back to end-of-text for tokenizers without one (it is only a filler)."""
    file = tokenizer_file(path) if path is not None else None
    eot_name = end_of_text(tok, _config_token(file, "eos_token") if file else None)
    pad_name = _first_present(tok, ((_config_token(file, "pad_token") if file else None), *PAD_NAMES))
    if eot_name is None:
        raise DataError(f"tokenizer {str(path or '')!r} has no end-of-text token (looked for "
                        f"{', '.join(EOT_NAMES)} and tokenizer_config.json's eos_token)")
    eot = tok.token_to_id(eot_name)
    return eot, eot if pad_name is None else tok.token_to_id(pad_name)


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tokenizer.json`` atomically (temporary name in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsio.atomic_path(path) as tmp:
        tok.save(str(tmp))
    return path


def write_hf_tokenizer(tokenizer_path: str | Path, out_dir: str | Path) -> None:
    """Copy ``tokenizer.json`` into ``out_dir`` with a ``tokenizer_config.json`` naming its specials, so that
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` works on a run or exported model directory."""
    src = tokenizer_file(tokenizer_path)
    tok = load_tokenizer(src)
    eot, pad = special_ids(tok, src)
    out = Path(out_dir)
    save_tokenizer(tok, out / "tokenizer.json")
    if (src.parent / "tokenizer_config.json").is_file():  # a checkpoint's own config (bos, chat template) wins
        fsio.write_text(out / "tokenizer_config.json",
                        (src.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
        return
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.id_to_token(eot),
              "pad_token": tok.id_to_token(pad), "bos_token": None, "unk_token": None,
              "clean_up_tokenization_spaces": False,  # byte-level text round-trips exactly; no space fixing
              "model_max_length": 1_000_000_000}
    fsio.write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


class ChunkEncoder:
    """Encodes a list of documents into one array  doc EOT doc EOT ...  of ``dtype`` ids."""

    def __init__(self, tok: Tokenizer, eot_id: int, dtype: np.dtype | str):
        self.tok = tok
        # document text is data, never control: "<|endoftext|>" inside a document is encoded as its bytes
        self.tok.encode_special_tokens = True
        self.eot = np.array([eot_id], dtype=np.dtype(dtype))
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> np.ndarray:
        encodings = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        parts: list[np.ndarray] = []
        for enc in encodings:
            parts.append(np.asarray(enc.ids, dtype=self.dtype))
            parts.append(self.eot)
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)


_worker_encoder: ChunkEncoder | None = None  # one per pool process, built by init_worker


def init_worker(path: str, eot_id: int, dtype: str) -> None:
    # each process is one worker: the Rust thread pool would only oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_encoder
    _worker_encoder = ChunkEncoder(Tokenizer.from_file(path), eot_id, dtype)


def encode_in_worker(texts: list[str]) -> np.ndarray:
    assert _worker_encoder is not None, "init_worker was not called in this process"
    return _worker_encoder(texts)
