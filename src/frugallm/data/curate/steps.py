"""The datatrove pipeline steps of ``frugallm curate``, and the meters behind its report.

Every stage step counts what goes in and what comes out (documents, UTF-8 bytes, tokens), why each removed
document went, and quotes a few of them. Each task writes its counts to ``meters/<stage>/<rank>.json`` when
its stream ends, before datatrove writes the task's completion marker, so a resumed run merges the files of
the tasks it skipped with those it ran, and the report is the same as an uninterrupted run's.

Tokens here are a cheap count, not BPE tokens: ``TOKEN_RULE`` below (a run of letters, digits and underscores,
or one punctuation mark). It is computed once per document and cached in its metadata until the text changes.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document as DTDocument
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import get_filter_result
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.lid import FastTextLID
from datatrove.utils.text import ngrams, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from frugallm import fsio
from frugallm.data.curate.code import code_rejection, detect_kind
from frugallm.data.curate.recipe import DecontaminateConfig, NearDedupConfig, QualityConfig, RunConfig
from frugallm.data.curate.text import text_kind, text_rejection, text_stats
from frugallm.errors import ConfigError

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
TOKEN_RULE = r"regex \w+|[^\w\s] (a run of letters, digits and underscores, or one punctuation mark); not BPE"
_SIZE = "_size"  # metadata cache: [utf-8 bytes, tokens] of the current text


def doc_size(doc: DTDocument) -> tuple[int, int]:
    cached = doc.metadata.get(_SIZE)
    if cached is None:
        cached = [len(doc.text.encode("utf-8")), len(TOKEN_PATTERN.findall(doc.text))]
        doc.metadata[_SIZE] = cached
    return cached[0], cached[1]


def text_changed(doc: DTDocument) -> None:
    doc.metadata.pop(_SIZE, None)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Curation's JSON (plans, meters, reports): atomic, compact indent, text kept as written."""
    fsio.write_json(path, data, indent=1, ensure_ascii=False)


class Meter:
    """Counts for one stage in one task."""

    def __init__(self, stage: str, examples: int = 3, example_chars: int = 240):
        self.stage, self.k, self.chars = stage, examples, example_chars
        self.counts = {side: {"docs": 0, "bytes": 0, "tokens": 0} for side in ("in", "out")}
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.extra: Counter[str] = Counter()
        self.kinds_out: Counter[str] = Counter()  # documents kept, by the kind the quality stage gave them
        self.edits: dict[str, dict[str, Any]] = {}  # per filter that changed text inside documents

    def _add(self, side: str, doc: DTDocument) -> None:
        n_bytes, n_tokens = doc_size(doc)
        c = self.counts[side]
        c["docs"] += 1
        c["bytes"] += n_bytes
        c["tokens"] += n_tokens

    def take(self, doc: DTDocument) -> None:
        self._add("in", doc)

    def keep(self, doc: DTDocument) -> None:
        self._add("out", doc)
        self.kinds_out[doc.metadata.get("kind", "unknown")] += 1

    def edit(self, name: str, doc: DTDocument, before: str) -> None:
        """Filter ``name`` changed ``doc``'s text from ``before``: count it and quote a few edits."""
        e = self.edits.setdefault(name, {"docs": 0, "chars_before": 0, "chars_removed": 0, "examples": []})
        e["docs"] += 1
        e["chars_before"] += len(before)
        e["chars_removed"] += len(before) - len(doc.text)
        if len(e["examples"]) < self.k:
            kept = {ln.strip() for ln in doc.text.split("\n")}  # C4 strips the lines it keeps
            removed = [ln for ln in before.split("\n") if ln.strip() and ln.strip() not in kept]
            e["examples"].append({"id": doc.id, "chars_before": len(before), "chars_after": len(doc.text),
                                  "removed_lines": [ln[:self.chars] for ln in removed[:5]],
                                  "removed_lines_total": len(removed)})

    def drop(self, doc: DTDocument, reason: str, note: str | None = None) -> None:
        self.reasons[reason] += 1
        quoted = self.examples.setdefault(reason, [])
        if len(quoted) < self.k:
            example = {"id": doc.id, "bytes": doc_size(doc)[0], "text": doc.text[:self.chars]}
            if note:
                example["note"] = note
            quoted.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "in": self.counts["in"], "out": self.counts["out"],
                "reasons": dict(self.reasons), "examples": self.examples, "extra": dict(self.extra),
                "kinds_out": dict(self.kinds_out), "edits": self.edits}

    def save(self, meter_dir: str, rank: int) -> None:
        write_json(Path(meter_dir) / self.stage / f"{rank:05d}.json", self.to_dict())


class CurateStep(PipelineStep):
    """A stage that judges documents one at a time: ``judge`` returns ``None`` to keep, or a reason."""

    type = "frugallm"
    stage = "stage"

    def __init__(self, meter_dir: str, run: RunConfig):
        super().__init__()
        self.meter_dir = meter_dir
        self.examples, self.example_chars = run.examples_per_reason, run.example_chars

    def new_meter(self) -> Meter:
        return Meter(self.stage, self.examples, self.example_chars)

    def judge(self, doc: DTDocument, meter: Meter) -> str | None:
        raise NotImplementedError

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        meter = self.new_meter()
        for doc in data or ():
            meter.take(doc)
            with self.track_time():
                reason = self.judge(doc, meter)
            if reason is None:
                meter.keep(doc)
                self.stat_update("forwarded")
                yield doc
            else:
                meter.drop(doc, reason, doc.metadata.pop("_note", None))
                self.stat_update("dropped", f"dropped_{reason}")
        meter.save(self.meter_dir, rank)


class SourceReader(PipelineStep):
    """Reads this task's share of the input files (every world_size-th line of ``inputs.jsonl``) with
    ``frugallm.data.sources``; its skip counters go to ``meters/source/<rank>.json``."""

    type = "📖 - READER"
    name = "frugallm sources"

    def __init__(self, inputs_file: str, meter_dir: str, text_field: str = "text"):
        super().__init__()
        self.inputs_file, self.meter_dir, self.text_field = inputs_file, meter_dir, text_field

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from frugallm.data.sources import SourceStats, iter_file

        stats = SourceStats()
        lines = Path(self.inputs_file).read_text(encoding="utf-8").splitlines()
        for line in lines[rank::world_size]:
            path, spec = json.loads(line)
            for doc in iter_file(Path(path), spec, text_field=self.text_field, stats=stats):
                yield DTDocument(text=doc.text, id=doc.id, metadata={"source": doc.source})
        write_json(Path(self.meter_dir) / "source" / f"{rank:05d}.json", stats.as_dict())


class ShardReader(JsonlReader):
    """Reads exactly ``<rank>.jsonl`` of a work folder. Datatrove's own reader deals files out by position,
    which would hand a task another task's shard when some task wrote none; dedup document indices must match."""

    def __init__(self, folder: str):
        super().__init__(folder, add_file_path=False)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = f"{rank:05d}.jsonl"
        if self.data_folder.isfile(name):
            yield from self.read_file(name)


def work_writer(folder: str) -> JsonlWriter:
    # intermediate shards are read once or twice and deleted with the work folder: compressing them cost
    # more time than any other step of the pass
    return JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None)


def _final_record(self: Any, document: DTDocument) -> dict[str, Any]:
    # what `frugallm train` reads: the text, plus where it came from
    return {"text": document.text, "id": document.id, "source": document.metadata.get("source", ""),
            "kind": document.metadata.get("kind", "")}


def final_writer(folder: str, run: RunConfig) -> PipelineStep:
    if run.output_format == "parquet":
        from datatrove.pipeline.writers.parquet import ParquetWriter

        return ParquetWriter(folder, output_filename=f"{run.shard_prefix}${{rank}}.parquet", adapter=_final_record)
    return JsonlWriter(folder, output_filename=f"{run.shard_prefix}${{rank}}.jsonl.gz", adapter=_final_record)


class NormaliseStep(CurateStep):
    name = "normalise (NFC, line endings)"
    stage = "normalise"

    def __init__(self, meter_dir: str, run: RunConfig, *, nfc: bool, line_endings: bool):
        super().__init__(meter_dir, run)
        self.nfc, self.line_endings = nfc, line_endings

    def judge(self, doc: DTDocument, meter: Meter) -> str | None:
        text = doc.text
        if self.line_endings and "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if text != doc.text:
            meter.extra["changed"] += 1
            doc.text = text
            text_changed(doc)
        return "empty" if not text.strip() else None


class WhitespaceTokenizer(WordTokenizer):
    """Words of text that datatrove's ``simplify_text`` already lower-cased and stripped of punctuation: a
    whitespace split gives the same words as spaCy's tokenizer there, about 300x faster."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in text.split("\n") if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(m.start(), m.end()) for m in re.finditer(r"[^\n]+", text)]


def word_tokenizer(name: str, language: str = "en") -> WordTokenizer | str:
    return WhitespaceTokenizer() if name == "whitespace" else language


class LocalModelLID(FastTextLID):
    """datatrove's fastText language identifier, loading the user's model file instead of downloading one."""

    def __init__(self, model_path: str, languages: list[str]):
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self) -> Any:
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


def _local_language_filter(cfg: Any) -> PipelineStep:
    from datatrove.pipeline.filters.language_filter import LanguageFilter

    try:
        lid = LanguageFilter(languages=list(cfg.languages), language_threshold=cfg.threshold)
    except ImportError as e:
        raise ConfigError(f"recipe field quality.prose.language: {e}") from None
    lid.model = LocalModelLID(cfg.model, list(cfg.languages))
    return lid


def _local_badwords_filter(cfg: Any) -> PipelineStep:
    from datatrove.pipeline.filters.c4_filters import C4BadWordsFilter

    words = [w.strip() for w in Path(cfg.word_list).read_text(encoding="utf-8").splitlines() if w.strip()]
    if not words:
        raise ConfigError(f"recipe field quality.prose.badwords.word_list: {cfg.word_list} holds no words")
    bad = C4BadWordsFilter(keep_fraction=cfg.keep_fraction, fail_on_missing_language=False, seed=0)
    # one list for every language: a word counts only between non-word characters, as in C4
    pattern = re.compile(r"(?:\W|^)({})(?:\W|$)".format("|".join(re.escape(w.lower()) for w in words)))
    bad._get_badwords = lambda lang: pattern  # type: ignore[method-assign]
    return bad


def build_prose_filters(cfg: QualityConfig) -> list[tuple[str, PipelineStep]]:
    """The enabled prose filters in FineWeb's order: language, bad words, repetition, quality, C4, FineWeb."""
    from frugallm.data.curate.recipe import datatrove_filters

    prose = cfg.prose
    out: list[tuple[str, PipelineStep]] = []
    if prose.language.enabled:
        out.append(("language", _local_language_filter(prose.language)))
    if prose.badwords.enabled:
        out.append(("badwords", _local_badwords_filter(prose.badwords)))
    for name, cls in datatrove_filters().items():
        spec = getattr(prose, name)
        if spec.enabled:
            out.append((name, cls(language=prose.language_code, **spec.params)))
    return out


class QualityStep(CurateStep):
    """Gives each document a kind (code, technical prose, prose) and judges it by that kind's rules: the code
    heuristics (code.py), the measured text rules (text.py), then any datatrove web filter the recipe turned
    on. A filter that changes text inside a document (C4 deletes lines) is counted per filter, with examples:
    no document is edited in silence. Only trailing whitespace dropped by a filter is put back, uncounted."""

    name = "quality (code heuristics, measured text rules, optional web filters)"
    stage = "quality"

    def __init__(self, meter_dir: str, run: RunConfig, cfg: QualityConfig):
        super().__init__(meter_dir, run)
        self.cfg = cfg
        self._prose: list[tuple[str, PipelineStep]] | None = None  # built in the worker: spaCy stays there

    def kind_of(self, doc: DTDocument) -> str:
        if self.cfg.kind != "auto":
            return self.cfg.kind
        kind = detect_kind(doc.text, doc.id)
        return kind if kind == "code" else text_kind(doc.text)

    def judge(self, doc: DTDocument, meter: Meter) -> str | None:
        kind = self.kind_of(doc)
        doc.metadata["kind"] = kind
        meter.extra[f"kind_{kind}"] += 1
        if kind == "code":
            if not self.cfg.code.enabled:
                return None
            reason = code_rejection(doc.text, self.cfg.code)
            return None if reason is None else f"code/{reason}"
        if self.cfg.text.enabled:
            reason = text_rejection(text_stats(doc.text), getattr(self.cfg.text, kind))
            if reason is not None:
                return f"text/{reason}"
        if self._prose is None:
            self._prose = build_prose_filters(self.cfg)
        for name, prose_filter in self._prose:
            before = doc.text
            keep, reason = get_filter_result(prose_filter.filter(doc))
            if not keep:
                doc.text = before
                return f"{name}/{reason or 'rejected'}"
            if doc.text != before:
                if doc.text.rstrip() == before.rstrip():
                    doc.text = before
                else:
                    meter.edit(name, doc, before)
                    meter.extra["changed"] += 1
                    text_changed(doc)
        return None


class Tracked(PipelineStep):
    """Meters a datatrove step that drops documents from a stream (exact or MinHash dedup filter): the
    documents it passes come out in order, so those missing between two of them are the ones it removed."""

    type = "frugallm"

    def __init__(self, inner: PipelineStep, stage: str, reason: str, meter_dir: str, run: RunConfig):
        super().__init__()
        self.inner, self.stage, self.reason, self.meter_dir = inner, stage, reason, meter_dir
        self.examples, self.example_chars = run.examples_per_reason, run.example_chars
        self.name = f"{stage}: {inner.name}"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        meter = Meter(self.stage, self.examples, self.example_chars)
        pending: deque[DTDocument] = deque()

        def feed() -> DocumentsPipeline:
            for doc in data or ():
                meter.take(doc)
                pending.append(doc)
                yield doc

        for kept in self.inner.run(feed(), rank, world_size):
            while pending and pending[0] is not kept:
                meter.drop(pending.popleft(), self.reason)
            pending.popleft()
            meter.keep(kept)
            yield kept
        while pending:
            meter.drop(pending.popleft(), self.reason)
        self.stats = self.inner.stats
        meter.save(self.meter_dir, rank)


def exact_content(doc: DTDocument) -> str:
    return doc.text


class NearDupVerify(PipelineStep):
    """Between MinHash stages 2 and 3: keep a candidate pair from the LSH buckets only if at least
    ``threshold`` of the bands*rows MinHash values of the two documents agree. That fraction is an unbiased
    estimate of their shingle Jaccard similarity, so the threshold means what it says, where LSH alone
    accepts a pair at similarity s with probability 1 - (1 - s^rows)^bands."""

    type = "🫂 - DEDUP"
    name = "frugallm MinHash verify"

    def __init__(self, sig_dir: str, dups_dir: str, out_dir: str, cfg: NearDedupConfig, meter_dir: str):
        super().__init__()
        self.sig_dir, self.dups_dir, self.out_dir = sig_dir, dups_dir, out_dir
        self.cfg, self.meter_dir = cfg, meter_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        cfg = self.cfg
        records = [np.fromfile(p, dtype="<u4").reshape(-1, 4) for p in sorted(Path(self.dups_dir).glob("*.dups"))]
        pairs = np.unique(np.concatenate(records), axis=0) if records else np.zeros((0, 4), np.uint32)
        keep = self._verified(pairs) if len(pairs) and cfg.threshold > 0 else np.ones(len(pairs), bool)
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # MinHash stage 3 expects a multiple of `bands` .dups files; all pairs go to the first
        for band in range(cfg.bands):
            data_out = pairs[keep].astype("<u4").tobytes() if band == 0 else b""
            (out / f"{band:05d}_00.dups").write_bytes(data_out)
        meter = Meter("near_dedup_pairs")
        meter.extra.update(candidate_pairs=int(len(pairs)), verified_pairs=int(keep.sum()),
                           rejected_pairs=int(len(pairs) - keep.sum()))
        meter.save(self.meter_dir, rank)

    def _verified(self, pairs: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        n_hashes = cfg.bands * cfg.rows
        fields = [(f"h{i}", "<u8") for i in range(cfg.rows)] + [("doc", "<u4")]
        dtype = np.dtype(fields)  # packed, as MinHash stage 1 writes it: rows x uint64, then uint32 doc index
        needed: dict[int, np.ndarray] = {}
        for f_col, d_col in ((0, 1), (2, 3)):
            for file_id in np.unique(pairs[:, f_col]):
                docs = pairs[pairs[:, f_col] == file_id, d_col]
                needed[int(file_id)] = np.union1d(needed.get(int(file_id), np.zeros(0, np.uint32)), docs)
        sigs = {f: np.zeros((len(d), n_hashes), np.uint64) for f, d in needed.items()}
        for band in range(cfg.bands):
            for file_id, docs in needed.items():
                path = Path(self.sig_dir) / f"bucket_{band:03d}" / f"{file_id:05d}.minhash.sig"
                rec = np.fromfile(path, dtype=dtype)
                rec = rec[np.isin(rec["doc"], docs)]
                rows = np.searchsorted(docs, rec["doc"])
                for i in range(cfg.rows):
                    sigs[file_id][rows, band * cfg.rows + i] = rec[f"h{i}"]
        keep = np.zeros(len(pairs), bool)
        for start in range(0, len(pairs), 65536):  # bounded memory: 64k pairs x bands*rows x 8 bytes x 2
            chunk = pairs[start:start + 65536]
            left = np.stack([sigs[int(f)][np.searchsorted(needed[int(f)], d)] for f, d in chunk[:, :2]])
            right = np.stack([sigs[int(f)][np.searchsorted(needed[int(f)], d)] for f, d in chunk[:, 2:]])
            keep[start:start + len(chunk)] = (left == right).mean(axis=1) >= cfg.threshold
        return keep


class DecontIndex(PipelineStep):
    """Hashes every n-gram of the evaluation sets into the index datatrove's ``NGramsDecontFilter`` reads
    (datatrove's own indexer loads lighteval tasks from the Hub; ours reads local files). Same normalisation,
    word splitting and hash function as the filter, so the hashes meet."""

    type = "🦠 - DECONT"
    name = "frugallm n-gram index"

    def __init__(self, eval_sets: list[str], index_dir: str, cfg: DecontaminateConfig, tokenizer: str,
                 meter_dir: str, text_field: str = "text"):
        super().__init__()
        self.eval_sets, self.index_dir, self.cfg = eval_sets, index_dir, cfg
        self.tokenizer, self.meter_dir, self.text_field = tokenizer, meter_dir, text_field

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        from datatrove.utils.hashing import create_hash_func

        from frugallm.data.sources import iter_documents

        dt_cfg = decont_config(self.cfg)
        tok = WhitespaceTokenizer() if self.tokenizer == "whitespace" else None
        if tok is None:
            from datatrove.utils.word_tokenizers import load_word_tokenizer

            tok = load_word_tokenizer("en")
        hash_fn = create_hash_func(dt_cfg.hash_config)
        hashes: set[int] = set()
        meter = Meter("decontaminate_index")
        for doc in iter_documents(self.eval_sets, text_field=self.text_field):
            words = tok.word_tokenize(simplify_text(doc.text, dt_cfg.norm_config))
            meter.extra["eval_documents"] += 1
            if len(words) < self.cfg.ngram:
                meter.extra["eval_documents_shorter_than_ngram"] += 1
            hashes.update(hash_fn(" ".join(g)) for g in ngrams(words, self.cfg.ngram))
        meter.extra["eval_ngrams"] = len(hashes)
        Path(self.index_dir).mkdir(parents=True, exist_ok=True)
        array = np.array(sorted(hashes), dtype=dt_cfg.hash_config.np_descr)
        array.tofile(Path(self.index_dir) / "eval.index.hashes")
        meter.save(self.meter_dir, rank)


def decont_config(cfg: DecontaminateConfig) -> Any:
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig

    return NGramsDecontConfig(n_grams=cfg.ngram)


class DecontStep(CurateStep):
    name = "decontaminate (datatrove n-gram filter)"
    stage = "decontaminate"

    def __init__(self, meter_dir: str, run: RunConfig, index_dir: str, cfg: DecontaminateConfig, tokenizer: str):
        super().__init__(meter_dir, run)
        self.index_dir, self.cfg, self.tokenizer = index_dir, cfg, tokenizer
        self._filter: PipelineStep | None = None

    def judge(self, doc: DTDocument, meter: Meter) -> str | None:
        if self._filter is None:
            from datatrove.pipeline.decont.n_grams import NGramsDecontFilter

            self._filter = NGramsDecontFilter(self.index_dir, config=decont_config(self.cfg),
                                              language=word_tokenizer(self.tokenizer))
        keep, reason = get_filter_result(self._filter.filter(doc))
        if keep:
            return None
        doc.metadata["_note"] = f"shares the {self.cfg.ngram}-gram: {doc.metadata.get('contaminated_ngram', '')}"
        return reason or "contaminated"
