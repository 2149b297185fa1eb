import gzip
import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from frugallm.data.sources import (
    Document,
    SourceStats,
    embedded_files,
    is_validation,
    iter_documents,
    resolve_inputs,
)
from frugallm.errors import DataError


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("alpha document\n", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# beta\n\ncafé ☕\n", encoding="utf-8")
    (root / "sub" / "c.py").write_bytes(b"\xef\xbb\xbfprint('gamma')\n")  # UTF-8 BOM, dropped
    (root / "bad.txt").write_bytes(b"latin-1 \xe9t\xe9 \xff\xfe")  # not UTF-8
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.rst").write_text("  \n\t\n", encoding="utf-8")
    (root / "notes").write_text("no suffix, still text\n", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # binary suffix: not a document at all
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")  # hidden: skipped
    rows = [json.dumps({"text": "row one", "meta": 1}), "{not json", json.dumps({"other": "no text field"}),
            "", json.dumps({"text": "row four"}), json.dumps(["a", "list"]), json.dumps({"text": ""})]
    (root / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with gzip.open(root / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "gz one"}) + "\n" + json.dumps({"text": "gz two"}) + "\n")
    table = pa.table({"text": ["pq zero", None, "pq two", "pq three"], "n": [0, 1, 2, 3]})
    pq.write_table(table, root / "sub" / "data.parquet", row_group_size=2)  # two row groups
    return root


def test_directory_reads_every_format_and_counts_skips(corpus: Path) -> None:
    stats = SourceStats()
    docs = list(iter_documents([str(corpus)], stats=stats))
    by_id = {Path(d.id.split(":")[0]).name + (":" + d.id.split(":")[1] if ":" in d.id else ""): d.text
             for d in docs}
    assert by_id == {
        "a.txt": "alpha document\n", "b.md": "# beta\n\ncafé ☕\n", "c.py": "print('gamma')\n",
        "notes": "no suffix, still text\n", "rows.jsonl:1": "row one", "rows.jsonl:5": "row four",
        "more.jsonl.gz:2": "gz two", "data.parquet:0": "pq zero", "data.parquet:2": "pq two",
        "data.parquet:3": "pq three",
    }
    assert all(d.source == str(corpus) for d in docs)
    # bad.txt; "{not json"; a row without "text", a list row, and gz row without "text"; empty/blank/null/""
    assert stats.skipped_undecodable == 1
    assert stats.skipped_malformed == 4
    assert stats.skipped_empty == 4  # empty.txt, blank.rst, parquet null, jsonl {"text": ""}
    assert stats.skipped_unreadable == 0
    assert stats.files == 10  # image.png and .git/HEAD are never opened
    assert stats.documents == len(docs) == 10
    assert stats.bytes == sum(len(d.text.encode()) for d in docs)


def test_order_is_sorted_and_repeatable(corpus: Path) -> None:
    first = [d.id for d in iter_documents([str(corpus)])]
    assert first == [d.id for d in iter_documents([str(corpus)])]
    files = [p for p, _ in resolve_inputs([str(corpus)])]
    assert files == sorted(files)


def test_glob_file_and_custom_text_field(corpus: Path) -> None:
    docs = list(iter_documents([str(corpus / "**" / "*.md"), str(corpus / "a.txt")]))
    assert [Path(d.id).name for d in docs] == ["b.md", "a.txt"]
    assert docs[0].source.endswith("*.md")
    body = list(iter_documents([str(corpus / "more.jsonl.gz")], text_field="body"))
    assert [(d.id.rsplit(":", 1)[1], d.text) for d in body] == [("1", "gz one")]


def test_parquet_without_the_column_is_a_clear_error(corpus: Path) -> None:
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents([str(corpus / "sub" / "data.parquet")], text_field="body"))


def test_corrupt_gzip_is_counted_not_raised(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 definitely not deflate")
    stats = SourceStats()
    assert list(iter_documents([str(tmp_path)], stats=stats)) == []
    assert stats.skipped_unreadable == 1


def test_missing_input_and_empty_glob_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents([str(tmp_path / "nope.txt")]))
    with pytest.raises(DataError, match="matches no files"):
        list(iter_documents([str(tmp_path / "*.jsonl")]))


def test_validation_split_is_deterministic_and_near_the_fraction() -> None:
    docs = [Document(id=str(i), text=f"document number {i}", source="t") for i in range(20_000)]
    val = [is_validation(d, 0.05) for d in docs]
    assert val == [is_validation(d, 0.05) for d in docs]
    assert 0.045 < sum(val) / len(docs) < 0.055
    # the split depends on the text only: an exact duplicate from another file lands on the same side
    assert all(is_validation(Document("x", d.text, "other"), 0.05) == v for d, v in zip(docs[:500], val[:500], strict=True))
    assert not any(is_validation(d, 0.0) for d in docs[:100])
    assert all(is_validation(d, 1.0) for d in docs[:100])


def test_embedded_corpus_is_stdlib_py_files_only() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = embedded_files()
    assert len(files) > 200
    assert all(f.suffix == ".py" for f in files)
    assert all("site-packages" not in f.parts and "dist-packages" not in f.parts for f in files)
    assert all(f.is_relative_to(stdlib) for f in files)
    assert stdlib / "os.py" in files
    assert [p for p, _ in resolve_inputs(None)] == files == [p for p, _ in resolve_inputs([])]
    docs = iter_documents(None)
    first = next(docs)
    assert first.source == "stdlib" and first.id == str(files[0])
