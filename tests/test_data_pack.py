import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from frugallm.cli import main
from frugallm.data import pack
from frugallm.data.loader import TokenLoader, iter_eval_batches, permute
from frugallm.data.pack import PreparedCorpus, ShardedTokens, prepare_corpus, token_dtype
from frugallm.data.sources import iter_documents
from frugallm.data.tokenizer import EOT, PAD, load_tokenizer, train_tokenizer, write_hf_tokenizer
from frugallm.errors import CheckpointError, DataError

WORDS = ("def class return import self value data model token train loop batch the of and to in is for "
         "while yield lambda None True False print(x) [i] {k: v} 0 1 2 42 3.14 café naïve 東京 🙂").split()


def _write_corpus(root: Path, n_docs: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 8))]
        indent = "    " * rng.randint(0, 2)
        (root / f"doc{i:04d}.txt").write_text("\n".join(indent + ln for ln in lines) + "\n", encoding="utf-8")
    (root / "quoted.txt").write_text(f"a document quoting {EOT} must stay one document\n", encoding="utf-8")
    (root / "undecodable.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    (root / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("data") / "corpus")


@pytest.fixture(scope="module")
def prepared(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedCorpus:
    cache = tmp_path_factory.mktemp("cache")
    return prepare_corpus([str(corpus_dir)], vocab_size=300, cache_dir=cache, val_fraction=0.1, num_workers=1,
                          progress=False)


# ------------------------------------------------------------------------------------------------ tokenizer
ROUND_TRIP = ["plain words", "  leading and trailing  ", "tabs\tand\r\nCRLF\n\n\n", "café naïve 東京 🙂 \u200b",
              "def f(x):\n        return x ** 2\n", "literal <|endoftext|> inside text", "", " ", "\x00\x01\x7f"]


def test_tokenizer_round_trips_exactly_and_loads_in_transformers(prepared: PreparedCorpus, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = load_tokenizer(prepared.tokenizer_path)
    assert tok.token_to_id(EOT) == prepared.eot_id == 0 and tok.token_to_id(PAD) == prepared.pad_id == 1
    tok.encode_special_tokens = True  # as packing encodes: document text never yields a special
    for text in ROUND_TRIP:
        ids = tok.encode(text).ids
        assert prepared.eot_id not in ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    hf = PreTrainedTokenizerFast(tokenizer_file=str(prepared.tokenizer_path))
    assert len(hf) == prepared.vocab_size
    for text in ROUND_TRIP[:5]:
        assert hf.decode(hf.encode(text, add_special_tokens=False), clean_up_tokenization_spaces=False) == text
    write_hf_tokenizer(prepared.tokenizer_path, tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.eos_token == EOT and auto.pad_token_id == prepared.pad_id
    assert auto.decode(auto.encode(ROUND_TRIP[2], add_special_tokens=False)) == ROUND_TRIP[2]


def test_trained_vocabulary_honours_the_size() -> None:
    tok = train_tokenizer(["aaaa bbbb aaaa bbbb abab " * 50] * 4, 270)
    assert tok.get_vocab_size() <= 270 and tok.get_vocab_size() > 258


# ------------------------------------------------------------------------------------------------ packing
def test_packing_joins_documents_with_eot_and_writes_an_index(prepared: PreparedCorpus, corpus_dir: Path) -> None:
    s = prepared.stats
    assert (s["documents"], s["skipped_undecodable"], s["skipped_empty"]) == (121, 1, 1)
    assert s["train"]["documents"] + s["val"]["documents"] == 121 and s["val"]["documents"] >= 5
    tok = load_tokenizer(prepared.tokenizer_path)
    texts = {d.text for d in iter_documents([str(corpus_dir)])}
    seen = set()
    for split, n_tokens in (("train", prepared.n_train_tokens), ("val", prepared.n_val_tokens)):
        tokens = prepared.tokens(split)
        assert tokens.dtype == np.uint16 and len(tokens) == n_tokens == s[split]["tokens"]
        assert tokens[-1] == prepared.eot_id  # every document, the last included, ends with EOT
        eots = np.flatnonzero(np.asarray(tokens) == prepared.eot_id)
        assert len(eots) == s[split]["documents"]
        docs = [tok.decode(piece.tolist()) for piece in np.split(np.asarray(tokens), eots + 1)[:-1]]
        assert all(docs)
        seen |= set(docs)
        if split == "val":
            assert prepared.val_bytes == sum(len(d.encode()) for d in docs)
    assert seen == texts
    assert prepared.bytes_per_token_val == prepared.val_bytes / prepared.n_val_tokens > 1.0
    index = json.loads((prepared.dir / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == prepared.vocab_size
    for split in ("train", "val"):
        for shard in index["splits"][split]["shards"]:
            assert (prepared.dir / shard["file"]).stat().st_size == 2 * shard["tokens"]
    assert not [p for p in prepared.dir.parent.iterdir() if p.name.endswith(".tmp")]


def test_token_dtype_boundary() -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def test_second_call_reuses_the_cache(prepared: PreparedCorpus, corpus_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    index_mtime = (prepared.dir / "index.json").stat().st_mtime_ns

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-tokenized a cached corpus")

    monkeypatch.setattr(pack, "_build", no_build)
    again = prepare_corpus([str(corpus_dir)], vocab_size=300, cache_dir=prepared.dir.parent, val_fraction=0.1,
                           num_workers=1, progress=False)
    assert again.cached and not prepared.cached
    assert again.dir == prepared.dir and (again.dir / "index.json").stat().st_mtime_ns == index_mtime
    assert np.array_equal(again.tokens("train"), prepared.tokens("train"))
    # a run directory's copy of the trained tokenizer, passed explicitly, finds the same shards
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(prepared.tokenizer_path, run_dir / "tokenizer.json")
    with_tok = prepare_corpus([str(corpus_dir)], vocab_size=999, cache_dir=prepared.dir.parent, val_fraction=0.1,
                              tokenizer_path=run_dir / "tokenizer.json", num_workers=1, progress=False)
    assert with_tok.cached and np.array_equal(with_tok.tokens("val"), prepared.tokens("val"))
    # a different setting is another preparation
    with pytest.raises(AssertionError, match="re-tokenized"):
        prepare_corpus([str(corpus_dir)], vocab_size=301, cache_dir=prepared.dir.parent, val_fraction=0.1,
                       num_workers=1, progress=False)


def test_changed_input_invalidates_and_failed_build_leaves_nothing(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_corpus(tmp_path / "c", n_docs=20)
    cache = tmp_path / "cache"
    first = prepare_corpus([str(root)], vocab_size=280, cache_dir=cache, num_workers=1, progress=False)
    (root / "doc0000.txt").write_text("changed text\n", encoding="utf-8")
    os.utime(root / "doc0000.txt", ns=(1, 1))
    real_build = pack._build

    def crash(files: object, out: Path, **kwargs: object) -> None:
        real_build(files, out, **kwargs)
        raise KeyboardInterrupt  # killed after writing everything but before the rename

    monkeypatch.setattr(pack, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([str(root)], vocab_size=280, cache_dir=cache, num_workers=1, progress=False)
    assert [p.name for p in cache.iterdir() if not p.is_symlink()] == [first.dir.name]  # no half-made one
    monkeypatch.setattr(pack, "_build", real_build)
    second = prepare_corpus([str(root)], vocab_size=280, cache_dir=cache, num_workers=1, progress=False)
    assert second.dir != first.dir and not second.cached


def test_sharded_and_parallel_packing_give_the_same_stream(prepared: PreparedCorpus, corpus_dir: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pack, "MIN_BYTES_FOR_WORKERS", 0)
    monkeypatch.setattr(pack, "CHUNK_BYTES", 2000)  # many chunks in flight across the two processes
    sharded = prepare_corpus([str(corpus_dir)], vocab_size=300, cache_dir=tmp_path,
                             tokenizer_path=prepared.tokenizer_path, val_fraction=0.1, num_workers=2,
                             progress=False, shard_tokens=1000)
    assert sharded.stats["workers"] == 2
    train = sharded.tokens("train")
    assert isinstance(train, ShardedTokens) and len(train.shards) > 3
    reference = np.asarray(prepared.tokens("train"))
    assert np.array_equal(np.asarray(train), reference)
    assert np.array_equal(train[995:2010], reference[995:2010]) and train[1500] == reference[1500]
    a = TokenLoader(sharded, "train", global_batch=4, window=33, seed=3)
    b = TokenLoader(prepared, "train", global_batch=4, window=33, seed=3)
    for _ in range(3):
        assert torch.equal(a.next_batch(), b.next_batch())


def test_given_tokenizer_with_a_large_vocabulary_packs_uint32(corpus_dir: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {EOT: 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    vocab.update({f"unused{i}": len(vocab) + i for i in range(70_000 - len(vocab))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tok.save(str(ckpt / "tokenizer.json"))
    corpus = prepare_corpus([str(corpus_dir / "doc0001.txt")], vocab_size=0, cache_dir=tmp_path / "cache",
                            tokenizer_path=ckpt, val_fraction=0.0, num_workers=1, progress=False)
    train = corpus.tokens("train")
    assert corpus.vocab_size == 70_000 and train.dtype == np.uint32 and corpus.pad_id == corpus.eot_id == 0
    assert tok.decode(np.asarray(train[:-1]).tolist()) == (corpus_dir / "doc0001.txt").read_text()
    assert corpus.n_val_tokens == 0


def test_empty_and_missing_corpus_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=r"no documents in .*1 undecodable, 1 empty"):
        prepare_corpus([str(tmp_path)], vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare_corpus([str(tmp_path / "missing")], vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    assert not [p for p in (tmp_path / "cache").iterdir()]


def _split_texts(corpus: PreparedCorpus, split: str) -> list[str]:
    tok = load_tokenizer(corpus.tokenizer_path)
    tokens = np.asarray(corpus.tokens(split))
    return [tok.decode(p.tolist()) for p in np.split(tokens, np.flatnonzero(tokens == corpus.eot_id) + 1)[:-1]]


def test_tiny_corpus_still_gets_a_validation_split_without_leaking_duplicates(tmp_path: Path) -> None:
    root = _write_corpus(tmp_path / "c", n_docs=3, seed=1)  # + quoted.txt: 4 distinct documents
    for p in list(root.glob("*.txt")):
        (root / f"copy_{p.name}").write_bytes(p.read_bytes())  # each twice: 8 documents
    corpus = prepare_corpus([str(root)], vocab_size=280, cache_dir=tmp_path / "cache", num_workers=1,
                            progress=False)
    assert (corpus.stats["train"]["documents"], corpus.stats["val"]["documents"]) == (6, 2)
    val, train = _split_texts(corpus, "val"), _split_texts(corpus, "train")
    assert len(set(val)) == 1 and not set(val) & set(train)


# ------------------------------------------------------------------------------------------------ loaders
@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permute_is_a_seeded_bijection(n: int) -> None:
    perm = permute(np.arange(n), n, seed=7, epoch=0)
    assert sorted(perm.tolist()) == list(range(n))
    assert np.array_equal(perm, permute(np.arange(n), n, seed=7, epoch=0))
    if n >= 64:
        assert not np.array_equal(perm, permute(np.arange(n), n, seed=7, epoch=1))
        assert not np.array_equal(perm, np.arange(n))


def test_loader_windows_are_deterministic_and_cover_an_epoch(prepared: PreparedCorpus) -> None:
    window, batch = 17, 6
    tokens = np.asarray(prepared.tokens("train")).astype(np.int64)
    n_windows = len(tokens) // window
    loader = TokenLoader(prepared, "train", global_batch=batch, window=window, seed=1)
    other = TokenLoader(prepared, "train", global_batch=batch, window=window, seed=1)
    reseeded = TokenLoader(prepared, "train", global_batch=batch, window=window, seed=2)
    start_of = {tokens[s:s + window].tobytes(): s for s in range(0, n_windows * window, window)}
    starts = []
    for _ in range(n_windows // batch):
        x = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (batch, window)
        assert torch.equal(x, other.next_batch())
        for row in x.numpy():
            assert row.tobytes() in start_of, "a row is not an aligned window of the split"
            starts.append(start_of[row.tobytes()])
    assert len(set(starts)) == len(starts)  # no window twice within an epoch
    assert not torch.equal(TokenLoader(prepared, "train", global_batch=batch, window=window, seed=1).next_batch(),
                           reseeded.next_batch())


def test_loader_resumes_exactly_from_its_state(prepared: PreparedCorpus) -> None:
    kwargs = dict(global_batch=8, window=65, seed=5)
    loader = TokenLoader(prepared, "train", **kwargs)
    n_steps = 3 * loader.n_windows // 8 + 2  # crosses epoch boundaries
    uninterrupted = [loader.next_batch() for _ in range(n_steps)]
    first = TokenLoader(prepared, "train", **kwargs)
    for _ in range(n_steps // 2):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = TokenLoader(prepared, "train", **kwargs)
    resumed.load_state_dict(state)
    for expected in uninterrupted[n_steps // 2:]:
        assert torch.equal(resumed.next_batch(), expected)
    with pytest.raises(CheckpointError, match="window"):
        TokenLoader(prepared, "train", global_batch=8, window=64, seed=5).load_state_dict(state)
    with pytest.raises(CheckpointError, match="seed"):
        TokenLoader(prepared, "train", global_batch=8, window=65, seed=6).load_state_dict(state)


def test_ranks_split_the_same_global_batch(prepared: PreparedCorpus) -> None:
    kwargs = dict(global_batch=6, window=33, seed=11)
    single = TokenLoader(prepared, "train", **kwargs)
    ranks = [TokenLoader(prepared, "train", rank=r, world_size=2, **kwargs) for r in range(2)]
    for _ in range(4):
        parts = [r.next_batch() for r in ranks]
        assert parts[0].shape == (3, 33)
        assert torch.equal(torch.cat(parts), single.next_batch())


def test_loader_rejects_a_split_shorter_than_a_window(prepared: PreparedCorpus) -> None:
    with pytest.raises(DataError, match="fewer than one window"):
        TokenLoader(prepared, "val", global_batch=2, window=prepared.n_val_tokens + 1, seed=0)


def test_eval_batches_are_sequential_windows(prepared: PreparedCorpus) -> None:
    tokens = np.asarray(prepared.tokens("val")).astype(np.int64)
    window = 16
    n = len(tokens) // window
    batches = list(iter_eval_batches(prepared, "val", batch=4, window=window))
    assert all(b.shape[1] == window and b.shape[0] <= 4 for b in batches)
    assert np.array_equal(torch.cat(batches).flatten().numpy(), tokens[:n * window])
    assert sum(len(b) for b in iter_eval_batches(prepared, "val", batch=4, window=window, max_windows=5)) == 5
    (whole,) = iter_eval_batches(prepared, "val", batch=4, window=len(tokens) + 10)
    assert whole.shape == (1, len(tokens))


# ------------------------------------------------------------------------------------------------ command
def test_prepare_command(corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["prepare", str(corpus_dir), "--vocab-size", "280", "--out", str(tmp_path), "--workers", "1",
            "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train" in out and "val" in out and "bytes / token" in out and "1 undecodable" in out
    assert main(argv) == 0 and "reused from cache" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
