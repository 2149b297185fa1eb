"""Atomic writes: every file and directory frugallm writes appears complete or not at all.

A write goes to a hidden temporary name in the destination's own directory (the same filesystem, so the rename
is atomic) and is renamed over the destination when it is complete. A reader never sees half a file, and an
interrupted write leaves the previous version in place. This guards against the process stopping (Ctrl-C, a
crash, a killed job), not against power loss: nothing is fsynced.

Temporary names are ``.NAME.<pid>.<random>.tmp``, created with the ordinary permissions (the umask), unlike
``tempfile``'s private 0600 files, since run directories are read by other processes and users.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temp_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name (safetensors, tokenizers,
    matplotlib, which picks the format from the ``suffix``): renamed onto ``path`` when the block completes,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8, whatever the locale."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False,
               ensure_ascii: bool = True) -> Path:
    """``data`` as JSON with a final newline."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n")


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rename the complete directory ``src`` onto ``dst``. A directory cannot be renamed over a non-empty one,
    so an existing ``dst`` first moves aside and is removed after: a crash between the two renames leaves the
    old version under the aside name, never a partial directory under ``dst``."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return dst
    old = _temp_name(dst, ".old")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary directory beside ``path`` to fill; it replaces ``path`` (``replace_dir``) when the
    block completes and is removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, ".tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
