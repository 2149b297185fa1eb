"""Document kinds for text (prose, technical prose) and the rules that judge them, with measured thresholds.

Web-crawl filters (Gopher, C4, FineWeb) were tuned on web pages: they reject a docstring with a usage
example, a README with a table, a design note with a code block. Here every non-code document is first
given a kind, then judged by five rules, each aimed at one kind of junk, with thresholds per kind:

    rule                 junk it exists for            figure (per document)
    min_words            near-empty pages              whitespace-separated words
    max_dup_line_frac    repeated boilerplate lines    characters in lines of >= 5 words that repeat an
                                                       earlier line, over characters in such lines
    max_top5_frac        keyword spam                  share of the content words (not stop words) taken
                                                       by the five most frequent ones
    min_stopword_frac    word salad                    share of alphabetic words that are English stop words
    min_alpha_word_frac  symbol soup                   share of words holding at least one letter

The thresholds live in ``text_thresholds.toml`` with how they were measured (``benchmarks/
curation_thresholds.py`` recomputes them): quantiles of real documents found on a development machine
(documentation under site-packages and /usr/share/doc, docstrings of installed third-party packages), never
of the evaluation set, which is the standard library's own text (``evalset.py``).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TEXT_KINDS = ("prose", "technical")
THRESHOLDS_FILE = Path(__file__).with_name("text_thresholds.toml")
RULES = ("min_words", "max_dup_line_frac", "max_top5_frac", "min_stopword_frac", "min_alpha_word_frac")

# English function words (a closed class: articles, pronouns, prepositions, auxiliaries, conjunctions)
STOP_WORDS = frozenset("""
a an the this that these those it its they them their there here he she his her we our you your i me my
is are was were be been being am do does did done has have had having will would shall should can could may
might must not no nor and or but if then else when while where which who whom whose what why how than as
of in on at by for with from to into onto over under about above below after before between through during
without within upon out up down off so too very also only just such each every any all some both either
neither other another same own more most less few many much one once again further
""".split())

# a line that marks technical prose: code, a prompt, a list item, a table row, a heading or markup
_TECH_LINE = re.compile(
    r"^(\s{4,}\S|\t|\s*(>>>|\.\.\.|\$ |[-*+•] |\d+[.)] |\||#{1,6} |\.\. |:[a-z]+:|```|~~~)|.*(::\s*$|`[^`]+`)"
    r"|\s*[=\-~^*#]{3,}\s*$)")
TECH_LINE_FRACTION = 0.1  # a definition, not a filter threshold: 1 line in 10 like the above makes it technical
_WORD = re.compile(r"[a-z]+")
_ALPHA = re.compile(r"[^\W\d_]")


def text_kind(text: str) -> str:
    """``"technical"`` when at least ``TECH_LINE_FRACTION`` of the non-blank lines are code, prompts, list
    items, table rows, headings or markup; else ``"prose"``."""
    lines = [ln for ln in text[:20000].split("\n") if ln.strip()][:400]
    if not lines:
        return "prose"
    tech = sum(1 for ln in lines if _TECH_LINE.match(ln))
    return "technical" if tech / len(lines) >= TECH_LINE_FRACTION else "prose"


@dataclass(frozen=True)
class TextStats:
    words: int
    dup_line_frac: float
    top5_frac: float
    stopword_frac: float
    alpha_word_frac: float


def text_stats(text: str) -> TextStats:
    tokens = text.split()
    seen: set[str] = set()
    long_chars = dup_chars = 0
    for line in text.split("\n"):
        line = " ".join(line.split())
        if line.count(" ") < 4:  # under 5 words: separators, code lines, headings repeat in good text
            continue
        long_chars += len(line)
        if line in seen:
            dup_chars += len(line)
        seen.add(line)
    words = _WORD.findall(text.lower())
    stops = sum(1 for w in words if w in STOP_WORDS)
    content = Counter(w for w in words if w not in STOP_WORDS and len(w) > 1)
    n_content = sum(content.values())
    top5 = sum(n for _, n in content.most_common(5))
    alpha = sum(1 for t in tokens if _ALPHA.search(t))
    return TextStats(words=len(tokens), dup_line_frac=dup_chars / long_chars if long_chars else 0.0,
                     top5_frac=top5 / n_content if n_content >= 20 else 0.0,
                     stopword_frac=stops / len(words) if len(words) >= 20 else 1.0,
                     alpha_word_frac=alpha / len(tokens) if tokens else 0.0)


@dataclass(kw_only=True, frozen=True)
class KindThresholds:
    min_words: int
    max_dup_line_frac: float
    max_top5_frac: float
    min_stopword_frac: float
    min_alpha_word_frac: float

    def __post_init__(self) -> None:
        from frugallm.errors import ConfigError

        if self.min_words < 0:
            raise ConfigError(f"text threshold min_words must be >= 0, got {self.min_words}")
        for name in RULES[1:]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"text threshold {name} must be in [0, 1], got {getattr(self, name)}")


def measured_thresholds() -> dict[str, KindThresholds]:
    """The thresholds per kind in ``text_thresholds.toml`` (its ``[prose]`` and ``[technical]`` tables)."""
    data = tomllib.loads(THRESHOLDS_FILE.read_text(encoding="utf-8"))
    return {kind: KindThresholds(**{r: data[kind][r] for r in RULES}) for kind in TEXT_KINDS}


def text_rejection(stats: TextStats, t: KindThresholds) -> str | None:
    """The first rule the document breaks, or ``None``."""
    if stats.words < t.min_words:
        return "min_words"
    if stats.dup_line_frac > t.max_dup_line_frac:
        return "max_dup_line_frac"
    if stats.alpha_word_frac < t.min_alpha_word_frac:
        return "min_alpha_word_frac"
    if stats.top5_frac > t.max_top5_frac:
        return "max_top5_frac"
    if stats.stopword_frac < t.min_stopword_frac:
        return "min_stopword_frac"
    return None
