"""frugallm.fsio: a write interrupted midway leaves the previous version and no temporary file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from frugallm import fsio


def test_write_json_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.json"
    fsio.write_json(path, {"x": 1})
    fsio.write_json(path, {"x": 2})
    assert path.read_text() == '{\n  "x": 2\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_failing_writer_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    fsio.write_text(path, "old")
    with pytest.raises(RuntimeError), fsio.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_swaps_a_whole_directory(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with fsio.atomic_dir(out) as d:
        (d / "one").write_text("1")
    with pytest.raises(RuntimeError), fsio.atomic_dir(out) as d:
        (d / "two").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["one"]
    with fsio.atomic_dir(out) as d:
        (d / "two").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["two"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
