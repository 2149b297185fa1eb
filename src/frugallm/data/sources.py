"""Where documents come from: text files, directories and globs, JSON lines, Parquet, and the embedded default.

The embedded corpus is the ``.py`` files of the running Python's standard library (``sysconfig``'s ``stdlib``
path, without ``site-packages``/``dist-packages``): about 1,800 files and 30 MB of real, varied text that exists
on every machine that runs frugallm, so ``frugallm train`` needs no download.

Reading never crashes on bad data: an undecodable file, a malformed JSON line, an empty document or an
unreadable file is skipped and counted in ``SourceStats``. A *missing* input is a user error (``DataError``),
because it is almost always a typo that would otherwise silently train on less data.

Document ids are stable across runs: the file path for a file, ``path:line`` (1-based) for a JSON-lines row,
``path:row`` (0-based) for a Parquet row. Files are visited in sorted order so iteration is deterministic.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from frugallm.errors import DataError

EMBEDDED = "stdlib"  # the source name of documents from the embedded corpus

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz", ".json", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
# Never documents: skipped silently during a directory walk (an explicitly named file is always tried).
BINARY_SUFFIXES = frozenset(
    ".pyc .pyo .so .dll .dylib .exe .o .a .bin .pt .pth .ckpt .safetensors .npy .npz .pkl .pickle .h5 .onnx "
    ".png .jpg .jpeg .gif .bmp .ico .webp .tif .tiff .svgz .pdf .mp3 .mp4 .wav .ogg .flac .avi .mov .mkv "
    ".zip .gz .tgz .bz2 .xz .zst .7z .tar .rar .whl .egg .jar .class .db .sqlite .arrow .feather .woff .woff2 "
    ".ttf .otf .eot".split())
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})


@dataclass(frozen=True)
class Document:
    id: str  # stable: file path, "path:line" for JSON lines, "path:row" for Parquet
    text: str
    source: str  # the input spec it came from ("stdlib" for the embedded corpus)


@dataclass
class SourceStats:
    """Counters filled while iterating; ``bytes`` counts UTF-8 bytes of the documents yielded."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_undecodable: int = 0
    skipped_empty: int = 0
    skipped_malformed: int = 0
    skipped_unreadable: int = 0

    @property
    def skipped(self) -> int:
        return self.skipped_undecodable + self.skipped_empty + self.skipped_malformed + self.skipped_unreadable

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, other: SourceStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by path relative to the stdlib root."""
    root = stdlib_dir()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: no cycles, no escaping the root
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # hidden directories (.git, .venv) and caches are never corpus text
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS]
        for f in filenames:
            p = Path(dirpath) / f
            if f.startswith(".") or _is_binary_name(f) or not p.is_file():
                continue
            out.append(p)
    return sorted(out)


def _is_binary_name(name: str) -> bool:
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES) or lower.endswith(PARQUET_SUFFIXES):
        return False
    return os.path.splitext(lower)[1] in BINARY_SUFFIXES


def resolve_inputs(inputs: Sequence[str] | None) -> list[tuple[Path, str]]:
    """Expand the input specs into ``(file, spec)`` pairs in reading order; ``None``/``[]`` is the embedded
    corpus. Raises ``DataError`` for an input that does not exist or a glob that matches nothing."""
    if isinstance(inputs, (str, os.PathLike)):  # one path, not a sequence of one-character inputs
        inputs = [str(inputs)]
    if not inputs:
        return [(p, EMBEDDED) for p in embedded_files()]
    pairs: list[tuple[Path, str]] = []
    for spec in inputs:
        spec = str(spec)
        if _has_glob(spec) and not os.path.exists(spec):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                raise DataError(f"input {spec!r} matches no files")
        else:
            path = Path(spec).expanduser()
            if not path.exists():
                raise DataError(f"input {spec!r} does not exist")
            matches = [str(path)]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                pairs.extend((f, spec) for f in _walk(p))
            elif p.is_file():
                pairs.append((p, spec))
    return pairs


def iter_documents(inputs: Sequence[str] | None, *, text_field: str = "text",
                   stats: SourceStats | None = None) -> Iterator[Document]:
    """Yield the documents of ``inputs`` (see the module docstring); counters go to ``stats`` if given."""
    stats = stats if stats is not None else SourceStats()
    for path, spec in resolve_inputs(inputs):
        yield from iter_file(path, spec, text_field=text_field, stats=stats)


def iter_file(path: Path, source: str, *, text_field: str = "text",
              stats: SourceStats | None = None) -> Iterator[Document]:
    """The documents of one file, dispatched on its suffix."""
    stats = stats if stats is not None else SourceStats()
    stats.files += 1
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        rows = _parquet_rows(path, text_field, stats)
    elif name.endswith(JSONL_SUFFIXES):
        rows = _json_rows(path, text_field, stats)
    else:
        rows = _text_file(path, stats)
    for doc_id, text in rows:
        if not text.strip():
            stats.skipped_empty += 1
            continue
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        yield Document(id=doc_id, text=text, source=source)


def _decode(raw: bytes) -> str | None:
    """Strict UTF-8 (a leading BOM dropped); ``None`` if undecodable or binary (NUL bytes are valid UTF-8
    but mean a binary or UTF-16 file, which would only teach the tokenizer noise)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    return text[1:] if text.startswith("\ufeff") else text


def _text_file(path: Path, stats: SourceStats) -> Iterator[tuple[str, str]]:
    try:
        raw = path.read_bytes()
    except OSError:
        stats.skipped_unreadable += 1
        return
    text = _decode(raw)
    if text is None:
        stats.skipped_undecodable += 1
        return
    yield str(path), text


def _row_text(value: object, stats: SourceStats) -> str | None:
    """A row's text field, or ``None`` (counted) when it is not usable text. Missing/null counts as empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        text = _decode(value)
        if text is None:
            stats.skipped_undecodable += 1
        return text
    stats.skipped_malformed += 1
    return None


def _json_rows(path: Path, text_field: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            first = f.read(1)
            while first and first.isspace():
                first = f.read(1)
            if first == b"[":  # a .json file holding one array of objects rather than JSON lines
                yield from _json_array(first + f.read(), path, text_field, stats)
                return
            f.seek(0)
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError:
                    stats.skipped_undecodable += 1
                    continue
                except ValueError:
                    stats.skipped_malformed += 1
                    continue
                if not isinstance(obj, dict) or text_field not in obj:
                    stats.skipped_malformed += 1
                    continue
                text = _row_text(obj[text_field], stats)
                if text is not None:
                    yield f"{path}:{lineno}", text
    except (OSError, EOFError, zlib.error):  # unreadable, truncated or corrupt gzip: keep what was read
        stats.skipped_unreadable += 1


def _json_array(raw: bytes, path: Path, text_field: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    try:
        items = json.loads(raw)
    except UnicodeDecodeError:
        stats.skipped_undecodable += 1
        return
    except ValueError:
        stats.skipped_malformed += 1
        return
    for i, obj in enumerate(items if isinstance(items, list) else [items]):
        if not isinstance(obj, dict) or text_field not in obj:
            stats.skipped_malformed += 1
            continue
        text = _row_text(obj[text_field], stats)
        if text is not None:
            yield f"{path}:{i}", text


def _parquet_rows(path: Path, text_field: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq  # imported here: pyarrow is slow to import and most runs read text

    try:
        pf = pq.ParquetFile(path)
    except Exception:  # pyarrow raises ArrowInvalid/OSError variants for a corrupt or non-Parquet file
        stats.skipped_unreadable += 1
        return
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); "
                        f"choose one with --text-field")
    row = 0
    try:
        for group in range(pf.num_row_groups):  # one row group in memory at a time
            values = pf.read_row_group(group, columns=[text_field]).column(0).to_pylist()
            for value in values:
                text = _row_text(value, stats)
                if text is not None:
                    yield f"{path}:{row}", text
                row += 1
    except (OSError, ValueError, io.UnsupportedOperation):
        stats.skipped_unreadable += 1


def doc_hash(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


def is_validation(doc: Document, fraction: float = 0.01) -> bool:
    """Deterministic split on the SHA-1 of the text: exact duplicates land in the same split (no leak from
    train to validation), and the split does not depend on order, paths or the machine."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"validation fraction must be in [0, 1], got {fraction}")
    return int.from_bytes(doc_hash(doc.text)[:8], "big") < fraction * 2.0 ** 64
