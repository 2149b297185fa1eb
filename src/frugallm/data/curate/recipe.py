"""The curation recipe: which stages run and with which thresholds.

A recipe is a TOML file whose tables mirror the dataclasses below; every field is optional and a missing one
keeps its default. ``default.toml`` (shipped beside this file) lists every field with its default and
the reason for it; ``frugallm curate --print-recipe`` prints it. Unknown fields and wrong types are errors that
name the field, so a typo never silently falls back to a default.

Stages run in this order: normalise -> quality -> exact_dedup -> near_dedup -> decontaminate. Quality comes
before deduplication (as in FineWeb) so that the expensive MinHash pass only sees documents that will be kept
anyway; exact dedup comes before near dedup so that the two never disagree about which copy survives.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frugallm.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_RECIPE = Path(__file__).with_name("default.toml")
KINDS = ("auto", "code", "prose", "technical")
# named recipes shipped beside this file: `--recipe web` is web.toml
NAMED_RECIPES = ("default", "web")
OUTPUT_FORMATS = ("jsonl.gz", "parquet")
WORD_TOKENIZERS = ("whitespace", "spacy")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"recipe field {name}: {message}")


@dataclass(kw_only=True)
class RunConfig:
    tasks: int = 0  # shards per parallel pass; 0 = one per worker. Fixed by the first run, kept on resume
    output_format: str = "jsonl.gz"
    shard_prefix: str = "part-"
    text_field: str = "text"  # the JSON/Parquet field holding the text of input documents
    examples_per_reason: int = 3
    example_chars: int = 240

    def __post_init__(self) -> None:
        _check(self.tasks >= 0, "run.tasks", f"must be >= 0 (0 = one per worker), got {self.tasks}")
        _check(self.output_format in OUTPUT_FORMATS, "run.output_format",
               f"must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
        _check(self.examples_per_reason >= 0, "run.examples_per_reason", "must be >= 0")
        _check(self.example_chars > 0, "run.example_chars", "must be > 0")


@dataclass(kw_only=True)
class NormaliseConfig:
    enabled: bool = True
    nfc: bool = True  # Unicode NFC: composed and decomposed accents become the same bytes (and dedup hashes)
    line_endings: bool = True  # \r\n and lone \r become \n


@dataclass(kw_only=True)
class ExactDedupConfig:
    enabled: bool = True


@dataclass(kw_only=True)
class NearDedupConfig:
    enabled: bool = True
    ngram: int = 5  # words per shingle, after datatrove's simplify_text (lowercase, no punctuation, 0 for digits)
    bands: int = 14  # LSH bands (datatrove's num_buckets)
    rows: int = 8  # MinHash values per band (datatrove's hashes_per_bucket)
    # a candidate pair from LSH is a duplicate only if this fraction of its bands*rows MinHash values agree
    # (an unbiased estimate of the shingle Jaccard similarity); 0 accepts every LSH candidate
    threshold: float = 0.75
    seed: int = 1
    tokenizer: str = "whitespace"  # "spacy" is datatrove's default but ~300x slower on already simplified text

    def __post_init__(self) -> None:
        _check(self.ngram >= 1, "near_dedup.ngram", f"must be >= 1, got {self.ngram}")
        _check(self.bands >= 1, "near_dedup.bands", f"must be >= 1, got {self.bands}")
        _check(self.rows >= 1, "near_dedup.rows", f"must be >= 1, got {self.rows}")
        _check(0.0 <= self.threshold <= 1.0, "near_dedup.threshold", f"must be in [0, 1], got {self.threshold}")
        _check(self.tokenizer in WORD_TOKENIZERS, "near_dedup.tokenizer",
               f"must be one of {', '.join(WORD_TOKENIZERS)}, got {self.tokenizer!r}")

    @property
    def lsh_threshold(self) -> float:
        """Similarity at which a pair becomes an LSH candidate with probability ~1/2: (1/b)^(1/r)."""
        return (1.0 / self.bands) ** (1.0 / self.rows)

    def candidate_probability(self, similarity: float) -> float:
        """P(a pair of Jaccard ``similarity`` shares at least one band) = 1 - (1 - s^r)^b."""
        return 1.0 - (1.0 - similarity ** self.rows) ** self.bands


@dataclass(kw_only=True)
class CodeFilterConfig:
    """Heuristics in the spirit of The Stack and StarCoder's data filtering (our own implementation)."""

    enabled: bool = True
    max_bytes: int = 1_000_000  # The Stack dropped files over 1 MB: almost always data, not code
    max_line_length: int = 1000  # minified or generated code
    max_mean_line_length: float = 100.0
    min_alphanum_fraction: float = 0.25  # of all characters: symbol soup, ASCII art, binary dumps
    min_alpha_fraction: float = 0.25  # letters among non-space characters: numeric tables
    generated_markers: tuple[str, ...] = (
        "auto-generated", "autogenerated", "automatically generated", "generated automatically",
        "this file is generated", "generated by", "do not edit")
    generated_scan_lines: int = 5  # markers are looked for in the first lines only, where tools write them
    max_encoded_run: int = 1024  # one base64 / hex / \\u-escape run longer than this means an embedded blob
    max_encoded_fraction: float = 0.5  # or when such runs are more than this fraction of the file

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_line_length", "generated_scan_lines", "max_encoded_run"):
            _check(getattr(self, name) > 0, f"quality.code.{name}", "must be > 0")
        _check(self.max_mean_line_length > 0, "quality.code.max_mean_line_length", "must be > 0")
        for name in ("min_alphanum_fraction", "min_alpha_fraction", "max_encoded_fraction"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"quality.code.{name}", "must be in [0, 1]")
        self.generated_markers = tuple(m.lower() for m in self.generated_markers)


def datatrove_filters() -> dict[str, type]:
    from datatrove.pipeline.filters.c4_filters import C4QualityFilter
    from datatrove.pipeline.filters.fineweb_quality_filter import FineWebQualityFilter
    from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
    from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter

    return {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
            "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}


@dataclass(kw_only=True)
class DatatroveFilterConfig:
    """A datatrove filter: ``enabled`` plus keyword arguments for its constructor (checked against it).
    Off by default: these are web-crawl filters (``--recipe web`` turns them on)."""

    enabled: bool = False
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class LanguageIdConfig:
    enabled: bool = False
    model: str = ""  # a local fastText language-id model (lid.176.bin or a GlotLID .bin); never downloaded
    languages: tuple[str, ...] = ("en",)
    threshold: float = 0.65


@dataclass(kw_only=True)
class BadWordsConfig:
    enabled: bool = False
    word_list: str = ""  # a local file, one word or phrase a line (e.g. the LDNOOBW list); never downloaded
    keep_fraction: float = 0.0


@dataclass(kw_only=True)
class ProseFiltersConfig:
    language_code: str = "en"  # datatrove's word-splitting language for the prose filters
    language: LanguageIdConfig = field(default_factory=LanguageIdConfig)
    badwords: BadWordsConfig = field(default_factory=BadWordsConfig)
    gopher_repetition: DatatroveFilterConfig = field(default_factory=DatatroveFilterConfig)
    gopher_quality: DatatroveFilterConfig = field(default_factory=DatatroveFilterConfig)
    # FineWeb kept C4's rules but not its terminal-punctuation line filter, which removed too much good text
    c4: DatatroveFilterConfig = field(
        default_factory=lambda: DatatroveFilterConfig(params={"filter_no_terminal_punct": False}))
    fineweb: DatatroveFilterConfig = field(default_factory=DatatroveFilterConfig)

    def __post_init__(self) -> None:
        classes = datatrove_filters()
        for name, cls in classes.items():
            spec: DatatroveFilterConfig = getattr(self, name)
            allowed = [p for p in inspect.signature(cls.__init__).parameters
                       if p not in ("self", "exclusion_writer", "language")]
            for key in spec.params:
                _check(key in allowed, f"quality.prose.{name}.{key}",
                       f"not an argument of datatrove's {cls.__name__}; allowed: {', '.join(allowed)}")


def _measured(kind: str) -> Any:
    from frugallm.data.curate.text import measured_thresholds

    return measured_thresholds()[kind]


@dataclass(kw_only=True)
class TextFilterConfig:
    """Our rules for prose and technical prose (text.py), thresholds per kind measured on real documents
    (text_thresholds.toml); a recipe may change any of them, e.g. ``[quality.text.technical] min_words = 50``."""

    enabled: bool = True
    prose: Any = field(default_factory=lambda: _measured("prose"))
    technical: Any = field(default_factory=lambda: _measured("technical"))


@dataclass(kw_only=True)
class QualityConfig:
    enabled: bool = True
    # which rules a document gets: auto (code by extension, then by content; else prose or technical prose
    # by its lines), or one kind for every document
    kind: str = "auto"
    text: TextFilterConfig = field(default_factory=TextFilterConfig)
    code: CodeFilterConfig = field(default_factory=CodeFilterConfig)
    prose: ProseFiltersConfig = field(default_factory=ProseFiltersConfig)

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, "quality.kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")


@dataclass(kw_only=True)
class DecontaminateConfig:
    enabled: bool = True  # runs only when evaluation sets are given (here or with --eval-set)
    ngram: int = 13  # GPT-3 / Llama decontamination used 13-grams of words
    eval_sets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self.ngram >= 1, "decontaminate.ngram", f"must be >= 1, got {self.ngram}")


@dataclass(kw_only=True)
class ExecutorConfig:
    # keyword arguments for datatrove's SlurmPipelineExecutor / RayPipelineExecutor (partition, time, ...)
    slurm: dict[str, Any] = field(default_factory=dict)
    ray: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    normalise: NormaliseConfig = field(default_factory=NormaliseConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def validate_local_files(self) -> None:
        """Filters that need a model or word list run only from a local file the user named; say so early."""
        lang, bad = self.quality.prose.language, self.quality.prose.badwords
        if self.quality.enabled and lang.enabled:
            _check(bool(lang.model), "quality.prose.language.model",
                   "language identification needs a local fastText model file (e.g. lid.176.bin); "
                   "frugallm downloads nothing at run time. Set model = PATH or enabled = false")
            _check(os.path.isfile(lang.model), "quality.prose.language.model", f"no such file: {lang.model}")
            try:
                import fasttext  # noqa: F401
            except ImportError:
                raise ConfigError("recipe field quality.prose.language: needs the fasttext package "
                                  "(pip install fasttext-numpy2-wheel)") from None
        if self.quality.enabled and bad.enabled:
            _check(bool(bad.word_list), "quality.prose.badwords.word_list",
                   "the bad-words filter needs a local word list (one entry a line); frugallm downloads "
                   "nothing at run time. Set word_list = PATH or enabled = false")
            _check(os.path.isfile(bad.word_list), "quality.prose.badwords.word_list",
                   f"no such file: {bad.word_list}")
        for path in self.decontaminate.eval_sets:
            _check(os.path.exists(path), "decontaminate.eval_sets", f"no such file or directory: {path}")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check one TOML value against a field's type hint; TOML arrays become tuples."""
    origin = typing.get_origin(hint)
    if hint is bool:
        _check(isinstance(value, bool), name, f"must be true or false, got {value!r}")
    elif hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer, got {value!r}")
    elif hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
               f"must be a number, got {value!r}")
        return float(value)
    elif hint is str:
        _check(isinstance(value, str), name, f"must be a string, got {value!r}")
    elif origin is tuple:
        _check(isinstance(value, list) and all(isinstance(v, str) for v in value), name,
               f"must be a list of strings, got {value!r}")
        return tuple(value)
    elif origin is dict:
        _check(isinstance(value, dict), name, f"must be a table, got {value!r}")
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _tuples(value: Any) -> Any:
    # datatrove filter arguments such as top_n_grams are tuples of tuples; TOML has only arrays
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> Any:
    """A copy of dataclass ``obj`` with the fields in ``data`` replaced (recursively), then re-validated."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    if isinstance(obj, DatatroveFilterConfig):
        # a datatrove filter table is flat: every key but `enabled` is a constructor argument
        data = dict(data)
        enabled = data.pop("enabled", obj.enabled)
        _coerce(enabled, bool, f"{prefix}enabled")
        return DatatroveFilterConfig(enabled=enabled, params={**obj.params, **_coerce(data, dict, prefix)})
    changes: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"recipe field {name}: unknown; allowed: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _check(isinstance(value, dict), name, "must be a table")
            changes[key] = _merge(current, value, f"{name}.")
        elif isinstance(current, dict):  # executor.slurm / executor.ray: merged key by key
            changes[key] = {**current, **_coerce(value, hints[key], name)}
        else:
            changes[key] = _coerce(value, hints[key], name)
    return dataclasses.replace(obj, **changes)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    return _merge(Recipe(), data, "")


def load_recipe(path: str | os.PathLike | None = None) -> Recipe:
    """The default recipe, with the fields of the TOML file at ``path`` (if any) replaced; ``path`` may
    also name a shipped recipe (``NAMED_RECIPES``: ``"web"`` is ``web.toml`` beside this file)."""
    if path is None or str(path) == "default":
        return Recipe()
    p = Path(path)
    if str(path) in NAMED_RECIPES and not p.is_file():
        p = DEFAULT_RECIPE.with_name(f"{path}.toml")
    if not p.is_file():
        raise ConfigError(f"recipe {p}: no such file (named recipes: {', '.join(NAMED_RECIPES)})")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"recipe {p}: not valid TOML ({e})") from None
    return recipe_from_dict(data)
