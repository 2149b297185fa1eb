"""Measure the thresholds of ``frugallm curate``'s text rules (``src/frugallm/data/curate/text.py``) on real
documents found on this machine, per kind (prose, technical prose), and print them as the TOML tables of
``text_thresholds.toml``.

    .venv/bin/python benchmarks/curation_thresholds.py [--quantile 0.01] [--max-docs 4000]

Real documents: ``.md``/``.rst``/``.txt`` files under site-packages and /usr/share/doc, and the docstrings of
30 words or more in third-party packages' ``.py`` files (site-packages). The standard library is left out on
purpose: it is the evaluation set (``frugallm.data.curate.evalset``). Each threshold is the ``--quantile``
(lower rules) or ``1 - --quantile`` (upper rules) of the real documents of that kind with >= 30 words, so by
construction about that fraction of such documents breaks each rule; ``min_words`` is a floor for near-empty
pages, its quantile taken over all documents. Prints one table and a RESULT line.
"""

from __future__ import annotations

import argparse
import ast
import random
import site
import sys
from pathlib import Path

import numpy as np

from frugallm.data.curate.code import detect_kind
from frugallm.data.curate.text import TEXT_KINDS, text_kind, text_stats

DOC_SUFFIXES = (".md", ".rst", ".txt")


def real_documents(max_docs: int, seed: int = 0) -> list[tuple[str, str]]:
    roots = [Path(p) for p in site.getsitepackages()] + [Path("/usr/share/doc")]
    docs: list[tuple[str, str]] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.stat().st_size > 1_000_000:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if path.suffix in DOC_SUFFIXES and "LICENSE" not in path.name.upper():
                docs.append((str(path), text))
            elif path.suffix == ".py" and "site-packages" in str(path):
                try:
                    tree = ast.parse(text)
                except (SyntaxError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc and len(doc.split()) >= 30:
                            docs.append((f"{path}:{getattr(node, 'name', 'module')}", doc))
    random.Random(seed).shuffle(docs)
    return docs[:max_docs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantile", type=float, default=0.01)
    ap.add_argument("--max-docs", type=int, default=4000)
    args = ap.parse_args()
    docs = real_documents(args.max_docs)
    by_kind: dict[str, list] = {k: [] for k in TEXT_KINDS}
    for name, text in docs:
        if detect_kind(text, name if not name.endswith(".txt") else "") == "code":
            continue
        by_kind[text_kind(text)].append(text_stats(text))
    q = args.quantile
    print(f"# measured by benchmarks/curation_thresholds.py --quantile {q} --max-docs {args.max_docs} "
          f"on Python {sys.version.split()[0]}")
    result = []
    for kind, stats in by_kind.items():
        sized = [s for s in stats if s.words >= 30]
        col = {f: np.array([getattr(s, f) for s in sized]) for f in
               ("dup_line_frac", "top5_frac", "stopword_frac", "alpha_word_frac")}
        words = np.array([s.words for s in stats])
        print(f"[{kind}]  # {len(stats)} documents, {len(sized)} with >= 30 words")
        print(f"min_words = {int(np.quantile(words, q))}")
        print(f"max_dup_line_frac = {np.quantile(col['dup_line_frac'], 1 - q):.3f}")
        print(f"max_top5_frac = {np.quantile(col['top5_frac'], 1 - q):.3f}")
        print(f"min_stopword_frac = {np.quantile(col['stopword_frac'], q):.3f}")
        print(f"min_alpha_word_frac = {np.quantile(col['alpha_word_frac'], q):.3f}")
        result.append(f"{kind}_docs={len(stats)}")
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
