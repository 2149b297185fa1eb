"""``frugallm prepare``: read, split, train a tokenizer, tokenize and pack a corpus into the cache, alone (the
training command does the same step itself and reuses this cache)."""

from __future__ import annotations

import argparse
import time

from frugallm.data.pack import DEFAULT_CACHE_DIR, TOKENIZER_TRAIN_BYTES, PreparedCorpus, prepare_corpus


def _summary(corpus: PreparedCorpus, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    s = corpus.stats
    table = Table(title=f"prepared corpus {'(reused from cache)' if corpus.cached else ''}".strip())
    table.add_column("")
    for col in ("documents", "text", "tokens", "bytes / token"):
        table.add_column(col, justify="right")
    for split in ("train", "val"):
        d = s[split]
        bpt = d["bytes"] / d["tokens"] if d["tokens"] else float("nan")
        table.add_row(split, f"{d['documents']:,}", f"{d['bytes'] / 1e6:,.2f} MB", f"{d['tokens']:,}", f"{bpt:.3f}")
    console = Console()
    console.print(table)
    skipped = {k.removeprefix("skipped_"): v for k, v in s.items() if k.startswith("skipped_") and v}
    console.print(f"files read: {s['files']:,}   skipped: {s['skipped']:,}"
                  + (f" ({', '.join(f'{v} {k}' for k, v in skipped.items())})" if skipped else ""))
    console.print(f"vocabulary: {corpus.vocab_size:,} (end-of-text {corpus.eot_id}, pad {corpus.pad_id}), "
                  f"{corpus.dtype.name} shards")
    console.print(f"cache: {corpus.dir}  ({seconds:.1f} s)", soft_wrap=True)
    console.print(f"tokenizer: {corpus.tokenizer_path}", soft_wrap=True)


def run_prepare(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    corpus = prepare_corpus(
        args.inputs or None, vocab_size=args.vocab_size, cache_dir=args.out, tokenizer_path=args.tokenizer,
        text_field=args.text_field, val_fraction=args.val_fraction, num_workers=args.workers,
        progress=not args.quiet, max_train_bytes_for_tokenizer=int(args.tokenizer_sample_mb * 2 ** 20) or None)
    _summary(corpus, time.perf_counter() - t0)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize and pack a corpus (default: the embedded stdlib corpus)",
                       description="Read text files, directories, globs, .jsonl(.gz) or .parquet; split "
                                   "train/validation by document hash; train a byte-level BPE tokenizer (or use "
                                   "--tokenizer); write token shards into a cache that later runs reuse.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, directories or globs (none: the Python standard library's .py files)")
    p.add_argument("--vocab-size", type=int, default=8192, metavar="N", help="tokenizer vocabulary in tokens (default 8192)")
    p.add_argument("--out", default=DEFAULT_CACHE_DIR, metavar="CACHE_DIR", help=f"cache directory (default {DEFAULT_CACHE_DIR})")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="use this tokenizer.json (or a directory with one, e.g. a checkpoint) instead of training")
    p.add_argument("--text-field", default="text", metavar="NAME", help="text field of .jsonl rows / .parquet column (default text)")
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="fraction of documents held out for validation (default 0.01)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="tokenizing processes (default: CPU count)")
    p.add_argument("--tokenizer-sample-mb", type=float, default=TOKENIZER_TRAIN_BYTES / 2 ** 20, metavar="MIB",
                   help=f"MiB of training text the tokenizer learns from (default {TOKENIZER_TRAIN_BYTES >> 20}; "
                        "0: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)
