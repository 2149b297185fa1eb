"""A labelled evaluation set for the quality filters, built from this Python's standard library.

Keep: real documents of each kind, from files every Python install has: docstrings of stdlib modules (prose,
or technical prose when they hold examples, lists or markup) and stdlib source files (code). Drop: junk of
each kind the filters exist for, generated with a fixed seed from the same words:

    boilerplate   a real paragraph followed by the same navigation / cookie / subscribe lines, repeated
    word_salad    words drawn uniformly from the docstrings' vocabulary, in sentence-shaped lines
    keyword_spam  a handful of product keywords repeated in varying order
    symbol_soup   runs of punctuation, digits and stray letters
    near_empty    a title and a few navigation words

The stdlib is left out of the threshold measurement (``text_thresholds.toml``), so this is held-out text.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JUNK_KINDS = ("boilerplate", "word_salad", "keyword_spam", "symbol_soup", "near_empty")
# stdlib packages whose modules give the evaluation documents: a fixed list, so the set is the same on
# every machine with this Python, and small, so building it takes about a second
EVAL_PACKAGES = ("json", "email", "logging", "http", "importlib", "asyncio", "concurrent", "xml", "unittest")
EVAL_MODULES = ("argparse.py", "collections/__init__.py", "functools.py", "pathlib.py", "subprocess.py",
                "textwrap.py", "typing.py", "dataclasses.py", "inspect.py", "shutil.py", "tarfile.py",
                "zipfile.py", "datetime.py", "decimal.py", "fractions.py", "statistics.py", "random.py",
                "string.py", "difflib.py", "heapq.py", "bisect.py", "contextlib.py", "enum.py", "pickle.py",
                "csv.py", "configparser.py", "ftplib.py", "smtplib.py", "imaplib.py", "pdb.py", "doctest.py",
                "pydoc.py", "socket.py", "ssl.py", "threading.py", "queue.py", "sched.py", "locale.py",
                "gettext.py", "optparse.py", "getopt.py", "shlex.py", "glob.py", "fnmatch.py", "tempfile.py")


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    kind: str  # prose, technical or code (keep); one of JUNK_KINDS (drop)
    keep: bool


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def eval_files() -> list[Path]:
    root = _stdlib()
    files = [root / m for m in EVAL_MODULES]
    for pkg in EVAL_PACKAGES:
        files += sorted(p for p in (root / pkg).rglob("*.py") if "test" not in p.parts)
    return [f for f in files if f.is_file()]


def stdlib_docstrings(files: list[Path], min_words: int) -> list[tuple[str, str]]:
    """(id, docstring) for every module, class and function docstring of ``min_words`` words or more."""
    root, out = _stdlib(), []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    out.append((f"{path.relative_to(root)}:{getattr(node, 'name', '<module>')}", doc))
    return out


BOILERPLATE = ["Home | About us | Products | Contact | Privacy policy | Terms of use",
               "We use cookies to improve your experience on our site. Accept all cookies",
               "Subscribe to our newsletter to get the latest news and offers in your inbox",
               "Copyright 2024 All rights reserved. Powered by our content platform"]
SPAM = ["cheap", "watches", "replica", "buy", "online", "discount", "luxury", "best", "price", "sale", "free",
        "shipping"]


def junk(kind: str, rng: random.Random, vocab: list[str], paragraph: str) -> str:
    if kind == "boilerplate":
        lines = [paragraph] + [line for _ in range(rng.randint(6, 12)) for line in BOILERPLATE]
        return "\n".join(lines)
    if kind == "word_salad":
        return "\n".join(" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 14))).capitalize() + "."
                         for _ in range(rng.randint(10, 25)))
    if kind == "keyword_spam":
        words = rng.sample(SPAM, 6) + ["the", "and", "for", "with"]
        return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))).capitalize() + "!"
                         for _ in range(rng.randint(8, 20)))
    if kind == "symbol_soup":
        chars = "!@#$%^&*()_+-=[]{}|;:'\",.<>/?~`0123456789 xq"
        return "\n".join("".join(rng.choice(chars) for _ in range(rng.randint(30, 70)))
                         for _ in range(rng.randint(10, 30)))
    if kind == "near_empty":
        title = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3))).title()
        return f"{title}\n\n" + " ".join(rng.sample(["Home", "Menu", "Login", "Search", "Back", "Next",
                                                     "Share", "Top"], rng.randint(2, 6)))
    raise ValueError(kind)


def build_eval_set(junk_per_kind: int = 60, seed: int = 0) -> list[Example]:
    from frugallm.data.curate.code import detect_kind
    from frugallm.data.curate.text import text_kind

    files = eval_files()
    root = _stdlib()
    real = []
    for doc_id, text in stdlib_docstrings(files, min_words=40):
        kind = "code" if detect_kind(text, "") == "code" else text_kind(text)
        real.append(Example(doc_id, text, kind, True))
    for path in files:
        text = path.read_text(encoding="utf-8")
        real.append(Example(str(path.relative_to(root)), text, "code", True))
    rng = random.Random(seed)
    vocab = sorted({w.strip(".,;:()").lower() for e in real if e.kind != "code" for w in e.text.split()
                    if w.strip(".,;:()").isalpha()})
    paragraphs = [e.text.split("\n\n")[0] for e in real if e.kind == "prose"]
    out = list(real)
    for kind in JUNK_KINDS:
        for i in range(junk_per_kind):
            out.append(Example(f"junk/{kind}/{i}", junk(kind, rng, vocab, rng.choice(paragraphs)), kind, False))
    return out


def evaluate(recipe: Any, examples: list[Example]) -> dict[str, Any]:
    """Judge every example with ``recipe``'s quality stage. Per kind: the share kept (real kinds) or removed
    (junk kinds); overall, junk detection's precision (junk among the removed) and recall (junk removed)."""
    from datatrove.data import Document

    from frugallm.data.curate.steps import Meter, QualityStep

    step = QualityStep("/nonexistent", recipe.run, recipe.quality)
    meter = Meter("quality")
    total: Counter[str] = Counter()
    right: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {}
    removed_real = removed_junk = 0
    for ex in examples:
        reason = step.judge(Document(text=ex.text, id=ex.id), meter)
        total[ex.kind] += 1
        right[ex.kind] += (reason is None) == ex.keep
        if reason is not None:
            reasons.setdefault(ex.kind, Counter())[reason] += 1
            removed_junk += not ex.keep
            removed_real += ex.keep
    n_junk = sum(1 for ex in examples if not ex.keep)
    return {"per_kind": {k: {"docs": total[k], "keep" if k not in JUNK_KINDS else "removed": right[k] / total[k]}
                         for k in total},
            "reasons": {k: dict(v) for k, v in reasons.items()},
            "precision": removed_junk / max(1, removed_junk + removed_real),
            "recall": removed_junk / max(1, n_junk)}
