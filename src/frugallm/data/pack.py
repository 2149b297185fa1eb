"""Packing: documents -> token shards on disk (``frugallm.data.loader`` reads them back).

Layout of one preparation, ``<cache_dir>/<key>/`` (``key`` hashes the inputs' paths, sizes and mtimes, the
settings, and this package's data code, so any change gives a fresh directory and a rerun reuses it):

    tokenizer.json          the trained (or copied) tokenizer
    train_00000.bin ...     raw token ids, uint16 when the vocabulary fits in 16 bits else uint32; each split is
    val_00000.bin ...       one stream  doc EOT doc EOT ...  cut into shards of at most ``shard_tokens`` tokens
    index.json              dtype, specials, shards with their token counts, document/byte/skip statistics

The directory is built under a temporary name and renamed when complete, so a killed run never leaves a
directory that a later run would reuse. Memory stays bounded: documents stream from the sources into chunks of
about 1 MB, at most ``2 * workers`` chunks are in flight, and encoded chunks are appended to the shard files.

"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from frugallm.data import tokenizer as tk
from frugallm.data.sources import (
    EMBEDDED,
    Document,
    SourceStats,
    doc_hash,
    is_validation,
    iter_file,
    resolve_inputs,
)
from frugallm.errors import ConfigError, DataError

PACK_VERSION = 1
DEFAULT_CACHE_DIR = "runs/.cache/data"
SHARD_TOKENS = 1 << 26  # 64M tokens per shard: 128 MB of uint16, small enough to copy around
CHUNK_BYTES = 1 << 20  # text per encoding task: large enough to amortise IPC, small enough to bound memory
# Text the tokenizer is trained on. Measured on the stdlib corpus (2 cores): 4 MB trains in 0.8 s, 16 MB in
# 7.6 s, 31 MB in 31 s; validation bytes/token 3.49, 3.54, 3.55: past ~16 MB the time grows faster than the gain.
TOKENIZER_TRAIN_BYTES = 16 << 20
SPLITS = ("train", "val")
MIN_BYTES_FOR_WORKERS = 4 * CHUNK_BYTES  # below this, starting processes costs more than encoding in-process


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, i.e. vocabularies up to 65,536; larger ones need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------------------------------- corpus
class ShardedTokens:
    """Read-only concatenation of a split's shard memmaps: ``len``, integer and contiguous-slice indexing."""

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])  # [n_shards + 1]
        self.dtype = shards[0].dtype

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: int | slice) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("ShardedTokens supports contiguous slices only")
            parts = []
            i = max(int(np.searchsorted(self.offsets, start, side="right")) - 1, 0)
            while start < stop:
                lo, hi = self.offsets[i], self.offsets[i + 1]
                take = min(stop, hi) - start
                parts.append(self.shards[i][start - lo:start - lo + take])
                start += take
                i += 1
            return np.concatenate(parts) if parts else np.empty(0, self.dtype)
        key = int(key) + (n if key < 0 else 0)
        if not 0 <= key < n:
            raise IndexError(key)
        i = int(np.searchsorted(self.offsets, key, side="right")) - 1
        return self.shards[i][key - self.offsets[i]]

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = np.concatenate(self.shards)
        return out if dtype is None else out.astype(dtype)


@dataclass
class PreparedCorpus:
    dir: Path  # cache directory of this preparation
    tokenizer_path: Path  # tokenizer.json
    vocab_size: int  # the tokenizer's real vocabulary size (specials included)
    eot_id: int
    pad_id: int
    n_train_tokens: int
    n_val_tokens: int
    val_bytes: int  # UTF-8 bytes of the validation text as packed (bits per byte = nats/token / ln 2 / this)
    stats: dict  # documents, bytes, skipped counts, per split
    cached: bool = False  # True when this call reused an existing preparation
    index: dict = field(default_factory=dict, repr=False)
    _tokens: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, directory: str | Path, *, cached: bool = True) -> PreparedCorpus:
        """Open a finished preparation (for example on resume); ``DataError`` if it is not one."""
        d = Path(directory)
        try:
            index = json.loads((d / "index.json").read_text(encoding="utf-8"))
            if index.get("format") != PACK_VERSION:
                raise ValueError(f"format {index.get('format')} != {PACK_VERSION}")
            splits = index["splits"]
            return cls(dir=d, tokenizer_path=d / index["tokenizer"], vocab_size=index["vocab_size"],
                       eot_id=index["eot_id"], pad_id=index["pad_id"], n_train_tokens=splits["train"]["tokens"],
                       n_val_tokens=splits["val"]["tokens"], val_bytes=splits["val"]["bytes"],
                       stats=index["stats"], cached=cached, index=index)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{d} is not a prepared corpus ({e})") from e

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.index.get("dtype", "uint16"))

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        """The split's token stream [N]: a read-only memmap (one shard, the usual case) or a ``ShardedTokens``
        view across shards; both support ``len`` and slicing."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._tokens:
            shards = [np.memmap(self.dir / s["file"], dtype=self.dtype, mode="r", shape=(s["tokens"],))
                      for s in self.index["splits"][split]["shards"] if s["tokens"] > 0]
            if not shards:
                self._tokens[split] = np.empty(0, self.dtype)
            else:
                self._tokens[split] = shards[0] if len(shards) == 1 else ShardedTokens(shards)
        return self._tokens[split]

    @property
    def bytes_per_token_val(self) -> float:
        return self.val_bytes / self.n_val_tokens if self.n_val_tokens else float("nan")


# ---------------------------------------------------------------------------------------------------- prepare
def prepare_corpus(inputs: Sequence[str] | None, *, vocab_size: int, cache_dir: Path | str = DEFAULT_CACHE_DIR,
                   tokenizer_path: str | Path | None = None, text_field: str = "text", val_fraction: float = 0.01,
                   num_workers: int | None = None, progress: bool = True,
                   max_train_docs_for_tokenizer: int | None = None,
                   max_train_bytes_for_tokenizer: int | None = TOKENIZER_TRAIN_BYTES,
                   shard_tokens: int = SHARD_TOKENS) -> PreparedCorpus:
    """Read, split, (train a tokenizer,) tokenize and pack ``inputs`` (``None``/``[]``: the embedded stdlib
    corpus), or reuse the cached result of an identical earlier call. See the module docstring for the layout.

    The tokenizer is trained on the training split only (validation text stays unseen), on a deterministic
    hash-sampled subset of at most ``max_train_bytes_for_tokenizer`` bytes / ``max_train_docs_for_tokenizer``
    documents (``None``: no limit). With ``tokenizer_path`` (a tokenizer.json or a directory holding one) no
    tokenizer is trained and ``vocab_size`` is ignored."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if tokenizer_path is None and vocab_size < tk.MIN_VOCAB:
        raise ConfigError(f"vocab_size must be at least {tk.MIN_VOCAB}, got {vocab_size}")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be positive, got {shard_tokens}")
    files = resolve_inputs(inputs)
    desc = _describe(inputs)
    if not files:
        raise DataError(f"no files found in {desc}")
    tok_file = tk.tokenizer_file(tokenizer_path) if tokenizer_path is not None else None
    settings = _settings(text_field, val_fraction, shard_tokens, vocab_size, tok_file,
                         max_train_docs_for_tokenizer, max_train_bytes_for_tokenizer)
    key = _cache_key(files, settings)
    cache = Path(cache_dir).expanduser()
    final = cache / key
    if (final / "index.json").is_file():
        try:
            return PreparedCorpus.load(final, cached=True)
        except DataError:  # unreadable or stale format: rebuild
            final.unlink() if final.is_symlink() else shutil.rmtree(final, ignore_errors=True)
    if final.is_symlink() and not final.exists():  # an alias whose preparation was deleted
        final.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(cache, key)
    tmp = cache / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build(files, tmp, desc=desc, inputs=inputs, settings=settings, tok_file=tok_file, vocab_size=vocab_size,
               text_field=text_field, val_fraction=val_fraction, num_workers=num_workers, progress=progress,
               max_docs=max_train_docs_for_tokenizer, max_bytes=max_train_bytes_for_tokenizer,
               shard_tokens=shard_tokens)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same preparation first: use theirs
            if not (final / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tok_file is None:
        # The same corpus packed with the tokenizer this call trained (e.g. a run directory's copy, as
        # `frugallm eval` passes it) gives identical shards: an alias name lets that call reuse these.
        trained = _settings(text_field, val_fraction, shard_tokens, vocab_size, final / "tokenizer.json", None, None)
        _symlink_atomic(cache / _cache_key(files, trained), key)
    return PreparedCorpus.load(final, cached=False)


def _settings(text_field: str, val_fraction: float, shard_tokens: int, vocab_size: int, tok_file: Path | None,
              max_docs: int | None, max_bytes: int | None) -> dict:
    """What, besides the input files and the code, decides the packed result. A given tokenizer replaces the
    vocabulary size and sampling limits, which only matter when training one."""
    return {"format": PACK_VERSION, "text_field": text_field, "val_fraction": val_fraction,
            "shard_tokens": shard_tokens, "vocab_size": None if tok_file else vocab_size,
            "tokenizer_sha256": _sha256_file(tok_file) if tok_file else None,
            "tokenizer_docs": None if tok_file else max_docs, "tokenizer_bytes": None if tok_file else max_bytes}


def _symlink_atomic(link: Path, target: str) -> None:
    if link.exists():
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except OSError:  # a filesystem without symlinks: the alias is only an optimisation
        tmp.unlink(missing_ok=True)


def _describe(inputs: Sequence[str] | None) -> str:
    if not inputs:
        return f"the embedded corpus ({EMBEDDED}: the Python standard library's .py files)"
    return ", ".join(repr(str(i)) for i in inputs)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _code_digest() -> str:
    """The data code itself is part of the key: a change to reading, splitting or packing must not reuse a
    preparation made by the old code."""
    import tokenizers

    h = hashlib.sha256(tokenizers.__version__.encode())
    here = Path(__file__).parent
    for name in ("sources.py", "tokenizer.py", "pack.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


def _cache_key(files: list[tuple[Path, str]], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(_code_digest().encode())
    for path, spec in files:
        try:
            st = path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{path.resolve()}\0{spec}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:20]


def _remove_stale_temps(cache: Path, key: str) -> None:
    """Temporary directories of the same preparation left by a killed process (its pid is gone)."""
    for d in cache.glob(f".{key}.*.tmp"):
        try:
            pid = int(d.name.split(".")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def _estimated_bytes(files: list[tuple[Path, str]]) -> tuple[int, bool]:
    """Text bytes the files will yield, and whether that is exact-ish (plain text) or a guess (compressed)."""
    total, exact = 0, True
    for path, _ in files:
        try:
            size = path.stat().st_size
        except OSError:
            continue
        name = path.name.lower()
        if name.endswith((".gz", ".parquet")):
            size *= 4  # typical text compression ratio; only used for sampling rates and the progress bar
            exact = False
        total += size
    return total, exact


def _iter_docs(files: list[tuple[Path, str]], text_field: str, stats: SourceStats) -> Iterator[Document]:
    for path, spec in files:
        yield from iter_file(path, spec, text_field=text_field, stats=stats)


def _tokenizer_sample(files: list[tuple[Path, str]], text_field: str, val_fraction: float, *, train_only: bool,
                      max_docs: int | None, max_bytes: int | None, counter: list[int]) -> Iterator[str]:
    """Training-split texts for the tokenizer: a hash-sampled subset spread over the whole corpus (not its
    first files, which in a sorted tree would be one directory), capped at ``max_bytes`` and ``max_docs``."""
    total, _ = _estimated_bytes(files)
    rate = 1.0 if not max_bytes or total <= max_bytes else max_bytes / total
    used = 0
    for doc in _iter_docs(files, text_field, SourceStats()):
        if train_only and is_validation(doc, val_fraction):
            continue
        # bytes 8..16 of the hash: independent of the train/val split, which uses bytes 0..8
        if rate < 1.0 and int.from_bytes(doc_hash(doc.text)[8:16], "big") >= rate * 2.0 ** 64:
            continue
        n = len(doc.text.encode("utf-8"))
        if max_bytes and used and used + n > max_bytes:
            if used >= 0.99 * max_bytes:
                break
            continue  # a large document that does not fit; a later, smaller one may
        used += n
        counter[0] += 1
        yield doc.text
        if max_docs is not None and counter[0] >= max_docs:
            break


class _ShardWriter:
    """Appends encoded chunks to ``<split>_NNNNN.bin`` files, starting a new shard every ``shard_tokens``."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.total = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self.file.write(part.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.total += len(part)

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file = open(self.directory / name, "wb")  # noqa: SIM115 - closed in close()
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None


def _build(files: list[tuple[Path, str]], out: Path, *, desc: str, inputs: Sequence[str] | None, settings: dict,
           tok_file: Path | None, vocab_size: int, text_field: str, val_fraction: float,
           num_workers: int | None, progress: bool, max_docs: int | None, max_bytes: int | None,
           shard_tokens: int) -> None:
    t0 = time.perf_counter()
    console = _console() if progress else None
    # -- tokenizer
    if tok_file is None:
        counter = [0]
        if console:
            console.print(f"[dim]training a {vocab_size}-token byte-level BPE on the training split...[/dim]")
        tok = tk.train_tokenizer(_tokenizer_sample(files, text_field, val_fraction, train_only=val_fraction < 1,
                                                   max_docs=max_docs, max_bytes=max_bytes, counter=counter),
                                 vocab_size, progress=progress and console.is_terminal)
        if counter[0] == 0:  # every document fell in validation (tiny corpus): learn from all of them
            tok = tk.train_tokenizer(_tokenizer_sample(files, text_field, val_fraction, train_only=False,
                                                       max_docs=max_docs, max_bytes=max_bytes, counter=counter),
                                     vocab_size, progress=progress and console.is_terminal)
        tk.save_tokenizer(tok, out / "tokenizer.json")
        eot, pad = tk.special_ids(tok)
    else:
        tok = tk.load_tokenizer(tok_file)
        eot, pad = tk.special_ids(tok, tok_file)
        shutil.copyfile(tok_file, out / "tokenizer.json")
        if (tok_file.parent / "tokenizer_config.json").is_file():  # keeps eos/pad names for later loads
            shutil.copyfile(tok_file.parent / "tokenizer_config.json", out / "tokenizer_config.json")
    t_tok = time.perf_counter() - t0
    real_vocab = tk.vocab_size(tok)
    dtype = token_dtype(real_vocab)

    # -- tokenize and pack
    stats = SourceStats()
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    split_stats = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
    total_bytes, exact = _estimated_bytes(files)
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    if total_bytes < MIN_BYTES_FOR_WORKERS:
        workers = 1
    executor = None
    if workers > 1:
        # spawn, not fork: the parent may hold torch/rayon threads, which fork would copy in a broken state
        executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=tk.init_worker,
                                       initargs=(str(out / "tokenizer.json"), eot, dtype.str))
        local = None
    else:
        local = tk.ChunkEncoder(tok, eot, dtype)
    pending: deque[tuple[str, int, int, Future | np.ndarray]] = deque()
    buffers: dict[str, list[str]] = {s: [] for s in SPLITS}
    buffered = dict.fromkeys(SPLITS, 0)
    bar = _Progress(console, total_bytes if exact else None)
    t1 = time.perf_counter()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            split, n_docs, n_bytes, job = pending.popleft()
            tokens = job.result() if isinstance(job, Future) else job  # [tokens of the chunk incl. EOTs]
            writers[split].write(tokens)
            bar.update(n_docs, n_bytes, len(tokens))

    def flush(split: str) -> None:
        texts = buffers[split]
        if not texts:
            return
        job = executor.submit(tk.encode_in_worker, texts) if executor else local(texts)
        pending.append((split, len(texts), buffered[split], job))
        buffers[split], buffered[split] = [], 0
        drain(2 * workers)

    def add(split: str, doc: Document) -> None:
        n = len(doc.text.encode("utf-8"))
        buffers[split].append(doc.text)
        buffered[split] += n
        split_stats[split]["documents"] += 1
        split_stats[split]["bytes"] += n
        if buffered[split] >= CHUNK_BYTES:
            flush(split)

    # A small corpus can hash no document into validation. To guarantee a validation split, the training
    # documents with the smallest split hash (the next a larger fraction would move; several only when they
    # are exact duplicates, which must stay together) are held back until a validation document appears; if
    # none does, they become the validation split, provided some other document is left to train on.
    held: list[Document] = []
    held_key = b""
    try:
        for doc in _iter_docs(files, text_field, stats):
            if is_validation(doc, val_fraction):
                add("val", doc)
                for h in held:
                    add("train", h)
                held = []
                continue
            if val_fraction > 0 and split_stats["val"]["documents"] == 0:
                key = doc_hash(doc.text)[:8]
                if not held or key < held_key:
                    for h in held:
                        add("train", h)
                    held, held_key = [doc], key
                    continue
                if key == held_key:
                    held.append(doc)
                    continue
            add("train", doc)
        to_val = split_stats["val"]["documents"] == 0 and split_stats["train"]["documents"] > 0
        for h in held:
            add("val" if to_val else "train", h)
        for s in SPLITS:
            flush(s)
        drain(0)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
        for w in writers.values():
            w.close()
        bar.close()
    if stats.documents == 0:
        raise DataError(f"no documents in {desc}: {stats.files} files read, {stats.skipped_undecodable} "
                        f"undecodable, {stats.skipped_empty} empty, {stats.skipped_malformed} malformed, "
                        f"{stats.skipped_unreadable} unreadable")
    t_pack = time.perf_counter() - t1
    for s in SPLITS:
        split_stats[s]["tokens"] = writers[s].total
        split_stats[s]["shards"] = writers[s].shards
    summary = {**stats.as_dict(), "skipped": stats.skipped,
               **{s: {k: v for k, v in split_stats[s].items() if k != "shards"} for s in SPLITS},
               "seconds": {"tokenizer": round(t_tok, 3), "tokenize": round(t_pack, 3)}, "workers": workers}
    index = {
        "format": PACK_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": [str(i) for i in inputs] if inputs else [EMBEDDED], "settings": settings,
        "tokenizer": "tokenizer.json", "tokenizer_source": str(tok_file) if tok_file else None,
        "vocab_size": real_vocab, "eot_id": eot, "pad_id": pad, "dtype": dtype.name,
        "splits": split_stats, "stats": summary,
    }
    # written last, inside the temporary directory: its presence marks a complete preparation
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


class _Progress:
    """Documents and tokens per second on a rich progress bar (a bar when the total text size is known)."""

    def __init__(self, console, total_bytes: int | None):  # type: ignore[no-untyped-def]
        self.t0 = time.perf_counter()
        self.docs = self.tokens = 0
        self.progress = None
        if console is None:
            return
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("tokenizing"), BarColumn(bar_width=20), TaskProgressColumn(),
            TextColumn("{task.fields[docs]:,} docs ({task.fields[docs_s]:,.0f}/s)  "
                       "{task.fields[tokens]:,} tokens ({task.fields[tok_s]:,.0f}/s)"),
            TimeElapsedColumn(), console=console, transient=False)
        self.task = self.progress.add_task("tokenize", total=total_bytes, docs=0, tokens=0, docs_s=0.0, tok_s=0.0)
        self.progress.start()

    def update(self, docs: int, n_bytes: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.progress is not None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.progress.update(self.task, advance=n_bytes, docs=self.docs, tokens=self.tokens,
                                 docs_s=self.docs / dt, tok_s=self.tokens / dt)

    def close(self) -> None:
        if self.progress is not None:
            task = self.progress.tasks[0]
            if task.total is not None:
                self.progress.update(self.task, completed=task.total)
            self.progress.stop()
            self.progress = None
