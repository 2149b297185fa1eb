"""Supervised fine-tuning data: ``.jsonl`` rows -> token ids with loss masks -> packed (or padded) batches.

Row kinds (one JSON object a line):
    {"messages": [{"role": ..., "content": ...}, ...]}   OpenAI chat; rendered by ``frugallm.data.chat``, the
                                                          renderer serving uses; loss on assistant turns
                                                          (``train_on``: every assistant turn, the last, all)
    {"prompt": ..., "completion": ...}                    joined as written, EOS after; loss on completion + EOS
    {"text": ...}                                         continued pretraining; loss on every token + EOS
An optional string ``group`` puts rows in the same split (the demo set groups by stdlib module).

Rows are never raised over: each bad row is counted under one reason (``REASONS``) and reported.
    not_json, not_object, empty_row, no_known_field   the line itself
    missing_role, unknown_role, non_string_content     a message (content must be a string)
    empty_assistant, no_assistant                      nothing to learn from (no_assistant is fine with
                                                       train_on="all")
    template_error, template_refused,                  the chat template failed, called raise_exception,
    template_not_prefix, no_eos_token                  rewrote history, or the default template lacks EOS
    too_long                                           over max_seq_len with overflow="drop", or nothing
                                                       trained left after truncation
Truncation keeps the first ``max_seq_len`` tokens and their mask entries together.

Split: a row is validation when the SHA-1 of its ``group`` (else of its canonical JSON) falls below
``val_fraction`` of the hash range: the same rows every run, whatever the file order or machine.

Batch contract for the model side (``pack``), every tensor ``[N, T]`` (N sequences of ``T = max_seq_len``):
    input_ids      token ids; pad positions hold ``pad_id``
    labels         the id the position must predict (already shifted: ``labels[t] = input_ids[t+1]``), or
                   -100 where that next token is not trained, belongs to another example, or is padding
    segment_ids    1, 2, ... for the examples packed into a row, 0 for padding: a query at t may attend to a
                   key at s only when ``s <= t`` and ``segment_ids[s] == segment_ids[t] != 0``
    position_ids   restart at 0 for each example (RoPE positions); 0 on padding
So the loss is ``cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` and an example
packed with others sees exactly what it would see alone. Padded mode (``packed=False``) puts one example in
each row, for comparison; the same tokens are trained either way.
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer

from frugallm.data import sources
from frugallm.data.chat import (
    ROLES,
    TRAIN_ON,
    ChatTemplate,
    ChatTemplateError,
    Rendered,
    TrainOn,
    render_completion,
    render_text,
    render_with_mask,
)
from frugallm.errors import ConfigError, DataError

IGNORE = -100
OVERFLOW = ("truncate", "drop")
REASONS = ("not_json", "not_object", "empty_row", "no_known_field", "missing_role", "unknown_role",
           "non_string_content", "empty_assistant", "no_assistant", "template_error", "template_refused",
           "template_not_prefix", "no_eos_token", "too_long")


@dataclass(frozen=True, kw_only=True)
class SFTConfig:
    max_seq_len: int = 2048  # tokens per example and per packed sequence
    overflow: Literal["truncate", "drop"] = "truncate"
    train_on: TrainOn = "assistant"
    val_fraction: float = 0.02

    def __post_init__(self) -> None:
        if self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be at least 2 tokens, got {self.max_seq_len}")
        if self.overflow not in OVERFLOW:
            raise ConfigError(f"overflow must be one of {', '.join(OVERFLOW)}, got {self.overflow!r}")
        if self.train_on not in TRAIN_ON:
            raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True, kw_only=True)
class Example:
    ids: list[int]
    mask: list[bool]  # True where the token is trained (its prediction from the token before is in the loss)
    where: str  # "path:line"

    @property
    def trained(self) -> int:
        return sum(self.mask[1:])  # the first token has nothing before it to be predicted from


@dataclass(kw_only=True)
class SFTReport:
    """What happened to every row: counts by kind and by refusal reason, tokens kept and trained, packing."""

    rows: int = 0
    kinds: Counter = field(default_factory=Counter)  # messages / completion / text, of the rows kept
    malformed: Counter = field(default_factory=Counter)  # reason -> rows
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "path:line: detail"
    truncated: int = 0
    train_rows: int = 0
    val_rows: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    packing: dict[str, Any] = field(default_factory=dict)

    def refuse(self, reason: str, where: str, detail: str = "") -> None:
        self.malformed[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < 3:  # enough to find the rows, not a copy of a bad file
            seen.append(f"{where}: {detail}" if detail else where)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"], d["malformed"] = dict(self.kinds), dict(sorted(self.malformed.items()))
        return d

    def write(self, path: str | Path) -> Path:
        from frugallm import fsio

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fsio.write_text(path, json.dumps(self.as_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    def format(self) -> str:
        kept = self.train_rows + self.val_rows
        lines = [f"rows {self.rows}: kept {kept} (train {self.train_rows}, validation {self.val_rows}), "
                 f"refused {sum(self.malformed.values())}, truncated {self.truncated}",
                 f"tokens {self.tokens}, trained {self.trained_tokens} ({self.trained_tokens / max(self.tokens, 1):.0%})"]
        lines += [f"  refused {reason}: {n}  e.g. {self.examples[reason][0]}"
                  for reason, n in sorted(self.malformed.items())]
        if self.packing:
            p = self.packing
            lines.append(f"packing into {p['seq_len']}-token sequences: {p['packed_sequences']} packed "
                         f"({p['packed_efficiency']:.0%} real tokens) against {p['padded_sequences']} padded "
                         f"({p['padded_efficiency']:.0%}): {p['speedup']:.2f}x fewer sequences to compute")
        return "\n".join(lines)


# ----- rows ---------------------------------------------------------------------------------------------
def read_jsonl(paths: Iterable[str | Path]) -> Iterator[tuple[str, str]]:
    """``("path:line", text of the line)`` for every line of every file; blank lines included (counted)."""
    for path in paths:
        p = Path(path)
        try:
            with p.open(encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    yield f"{p}:{n}", line
        except OSError as e:
            raise DataError(f"cannot read {p}: {e.strerror}") from None


def check_row(line: str, *, train_on: TrainOn = "assistant") -> tuple[dict[str, Any] | None, str, str]:
    """``(row, kind, "")`` for a usable line, else ``(None, reason, detail)``."""
    if not line.strip():
        return None, "empty_row", "blank line"
    try:
        row = json.loads(line)
    except ValueError as e:
        return None, "not_json", str(e)
    if not isinstance(row, dict):
        return None, "not_object", type(row).__name__
    if not row:
        return None, "empty_row", "{}"
    if "messages" in row:
        return _check_messages(row, train_on)
    if "prompt" in row or "completion" in row:
        p, c = row.get("prompt"), row.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            return None, "non_string_content", "prompt and completion must both be strings"
        if not c.strip():
            return None, "empty_assistant", "empty completion"
        return row, "completion", ""
    if "text" in row:
        if not isinstance(row["text"], str):
            return None, "non_string_content", "text must be a string"
        return (row, "text", "") if row["text"].strip() else (None, "empty_row", "empty text")
    return None, "no_known_field", f"keys {', '.join(sorted(map(str, row)))}; expected messages, prompt/completion or text"


def _check_messages(row: dict[str, Any], train_on: TrainOn) -> tuple[dict[str, Any] | None, str, str]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return None, "empty_row", "messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            return None, "missing_role", f"messages[{i}]"
        if m["role"] not in ROLES:
            return None, "unknown_role", f"messages[{i}].role {m['role']!r}"
        if not isinstance(m.get("content"), str):
            return None, "non_string_content", f"messages[{i}].content"
        if m["role"] == "assistant" and not m["content"].strip():
            return None, "empty_assistant", f"messages[{i}]"
    if train_on != "all" and not any(m["role"] == "assistant" for m in messages):
        return None, "no_assistant", f"{len(messages)} messages"
    return row, "messages", ""


def split_key(row: dict[str, Any]) -> str:
    group = row.get("group")
    return group if isinstance(group, str) else json.dumps(row, sort_keys=True, ensure_ascii=False)


def is_validation(row: dict[str, Any], fraction: float) -> bool:
    """The rule ``data.sources`` splits documents by, on the row's group or content."""
    return sources.is_validation(sources.Document(id="", text=split_key(row), source=""), fraction)


def encode_row(row: dict[str, Any], kind: str, tokenizer: Tokenizer, template: ChatTemplate,
               train_on: TrainOn = "assistant") -> Rendered:
    """Token ids and mask of a checked row. Raises ChatTemplateError for conversations it cannot mask."""
    if kind == "messages":
        return render_with_mask(row["messages"], tokenizer, template, train_on=train_on)
    if not template.eos_token:
        raise ChatTemplateError("this tokenizer names no EOS token to end the row with", reason="no_eos_token")
    if kind == "completion":
        return render_completion(row["prompt"], row["completion"], tokenizer, template.eos_token)
    return render_text(row["text"], tokenizer, template.eos_token)


@dataclass(kw_only=True)
class SFTData:
    train: list[Example]
    val: list[Example]
    report: SFTReport


def load_sft(paths: Sequence[str | Path], tokenizer: Tokenizer, template: ChatTemplate,
             config: SFTConfig | None = None) -> SFTData:
    """Read, check, render, truncate or drop, and split every row of ``paths``."""
    cfg = config or SFTConfig()
    rep = SFTReport()
    train: list[Example] = []
    val: list[Example] = []
    for where, line in read_jsonl(paths):
        rep.rows += 1
        row, kind, detail = check_row(line, train_on=cfg.train_on)
        if row is None:
            rep.refuse(kind, where, detail)
            continue
        try:
            r = encode_row(row, kind, tokenizer, template, cfg.train_on)
        except ChatTemplateError as e:
            rep.refuse(e.reason, where, str(e))
            continue
        ids, mask = r.ids, r.mask
        if len(ids) > cfg.max_seq_len:
            if cfg.overflow == "drop":
                rep.refuse("too_long", where, f"{len(ids)} tokens > max_seq_len {cfg.max_seq_len}")
                continue
            ids, mask = ids[: cfg.max_seq_len], mask[: cfg.max_seq_len]
            if not any(mask[1:]):
                rep.refuse("too_long", where, f"nothing trained in the first {cfg.max_seq_len} tokens")
                continue
            rep.truncated += 1
        ex = Example(ids=ids, mask=mask, where=where)
        if ex.trained == 0:  # e.g. a one-token text row: no prediction to learn
            rep.refuse("empty_row", where, "no trained token")
            continue
        rep.kinds[kind] += 1
        rep.tokens += len(ids)
        rep.trained_tokens += ex.trained
        (val if is_validation(row, cfg.val_fraction) else train).append(ex)
    rep.train_rows, rep.val_rows = len(train), len(val)
    rep.packing = packing_report(train, cfg.max_seq_len)
    return SFTData(train=train, val=val, report=rep)


# ----- batches ------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SFTBatch:
    input_ids: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T] next-token targets, IGNORE outside the mask, at boundaries and on padding
    segment_ids: torch.Tensor  # [N, T] 1.. per example in the row, 0 on padding
    position_ids: torch.Tensor  # [N, T] from 0 within each example

    @property
    def efficiency(self) -> float:
        """Share of computed positions holding a real token."""
        return (self.segment_ids != 0).float().mean().item()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SFTBatch:
        return SFTBatch(**{k: getattr(self, k).to(device, non_blocking=non_blocking) for k in _FIELDS})

    def rows(self, index: torch.Tensor | slice) -> SFTBatch:
        return SFTBatch(**{k: getattr(self, k)[index] for k in _FIELDS})

    def split(self, rows: int) -> list[SFTBatch]:
        """Micro-batches of ``rows`` sequences (the last may be shorter), as ``Tensor.split``."""
        return [self.rows(slice(i, i + rows)) for i in range(0, len(self), rows)]

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids != 0).sum())


_FIELDS = ("input_ids", "labels", "segment_ids", "position_ids")


def _bins(examples: Sequence[Example], seq_len: int, packed: bool) -> list[list[int]]:
    if not packed:
        return [[i] for i in range(len(examples))]
    # first fit, in file order: deterministic, and within a few percent of optimal for many short examples
    bins: list[list[int]] = []
    free: list[int] = []
    for i, ex in enumerate(examples):
        n = len(ex.ids)
        b = next((b for b, room in enumerate(free) if room >= n), None)
        if b is None:
            bins.append([])
            free.append(seq_len)
            b = len(bins) - 1
        bins[b].append(i)
        free[b] -= n
    return bins


def pack(examples: Sequence[Example], seq_len: int, pad_id: int, *, packed: bool = True) -> SFTBatch:
    """All ``examples`` as ``[N, seq_len]`` sequences, several to a row (``packed``) or one each (padded); the
    contract is in the module docstring."""
    if any(len(ex.ids) > seq_len for ex in examples):
        raise ConfigError(f"an example is longer than seq_len {seq_len}; load it with max_seq_len <= seq_len")
    rows = _bins(examples, seq_len, packed)
    shape = (len(rows), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    segment_ids = torch.zeros(shape, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, 1):
            ids, mask = examples[i].ids, examples[i].mask
            n = len(ids)
            ids_t = torch.tensor(ids, dtype=torch.long)  # [n]
            target = torch.where(torch.tensor(mask[1:], dtype=torch.bool), ids_t[1:], IGNORE)  # [n-1]
            input_ids[r, at : at + n] = ids_t
            labels[r, at : at + n - 1] = target  # the example's last position predicts nothing of its own
            segment_ids[r, at : at + n] = seg
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
    return SFTBatch(input_ids=input_ids, labels=labels, segment_ids=segment_ids, position_ids=position_ids)


def packing_report(examples: Sequence[Example], seq_len: int) -> dict[str, Any]:
    """Packed against padded, counted rather than timed: at the same tokens/s per computed position, training
    is ``speedup`` times faster packed (attention's quadratic term aside)."""
    packed, padded = len(_bins(examples, seq_len, True)), len(examples)
    real = sum(len(ex.ids) for ex in examples)
    return {"seq_len": seq_len, "packed_sequences": packed, "padded_sequences": padded,
            "packed_efficiency": real / max(packed * seq_len, 1), "padded_efficiency": real / max(padded * seq_len, 1),
            "speedup": padded / max(packed, 1)}


# ----- the built-in demo set ----------------------------------------------------------------------------
def stdlib_chat_rows(limit: int = 2000, *, max_body_lines: int = 30) -> list[dict[str, Any]]:
    """Chat rows from the running Python's standard library: the user gives a top-level function's signature
    and docstring, the assistant answers with its body. ``group`` is the module, so the split keeps a module's
    functions together. Deterministic (files in sorted order), no downloads, at most ``limit`` rows."""
    from frugallm.data.sources import embedded_files, stdlib_dir

    root, rows = stdlib_dir(), []
    for path in embedded_files():
        rel = path.relative_to(root)
        if any(part in ("test", "tests", "idle_test") for part in rel.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        module = ".".join(rel.with_suffix("").parts)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
                continue
            doc = ast.get_docstring(node)
            first, last = node.body[1].lineno, node.body[-1].end_lineno or node.body[-1].lineno
            if not doc or last - first + 1 > max_body_lines:
                continue
            head = "\n".join(lines[node.lineno - 1 : node.body[0].end_lineno])  # signature + docstring as written
            body = "\n".join(lines[first - 1 : last])
            rows.append({"group": module, "messages": [
                {"role": "user", "content": f"Write the body of this function from `{module}`:\n\n{head}"},
                {"role": "assistant", "content": body}]})
            if len(rows) >= limit:
                return rows
    return rows
