"""Does curation pay? The embedded corpus (the standard library's .py files) raw against curated by
``frugallm curate``, each used to train the ``tiny`` preset for the same number of tokens with the same seed,
both evaluated on the same held-out text: the raw corpus's validation split. Prints a table and a final
RESULT line.

    .venv/bin/python benchmarks/curation_ablation.py [--out runs/ablation] [--max-tokens 2e6] [--seed 0]
        [--workers 2] [--reuse-curated]

What is compared, and how:
- curation: ``frugallm curate --out OUT/curated`` with the default recipe, from scratch (unless
  ``--reuse-curated``), timed by its report: documents per second over the passes, on ``--workers`` cores;
- the raw corpus is written once to OUT/raw (same texts and ids as the embedded corpus) so both runs and both
  evaluations read files the same way;
- ``frugallm train --data OUT/raw`` and ``frugallm train --data OUT/curated --tokenizer RAW_RUN/tokenizer.json``:
  the curated run reuses the raw run's tokenizer, so "the same number of tokens" is the same unit for both
  and the difference is the data alone; the time budget is lifted so ``--max-tokens`` ends both runs;
- ``frugallm eval RUN --data OUT/raw --json`` for both: validation bits per byte on the raw validation split
  (documents are assigned to it by the SHA-1 of their text, so a curated document that kept its text is in
  the same split, and no validation document is trained on by either run).
Tokens removed are given twice: curate's cheap regex count, and BPE tokens of the raw run's tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def frugallm(*args: str, capture: bool = False) -> str:
    cmd = [sys.executable, "-m", "frugallm", *args]
    print("$ frugallm " + " ".join(args), flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`frugallm {' '.join(args)}` failed with exit code {done.returncode}")
    return done.stdout or ""


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON in the command's output:\n{text[-2000:]}")


def write_raw(out: Path) -> int:
    from frugallm.data.sources import iter_documents

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with gzip.open(out / "raw.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in iter_documents(None):
            f.write(json.dumps({"text": doc.text, "id": doc.id}) + "\n")
            n += 1
    return n


def bpe_tokens(tokenizer_file: Path, folder: Path) -> int:
    from tokenizers import Tokenizer

    from frugallm.data.sources import iter_documents

    tok = Tokenizer.from_file(str(tokenizer_file))
    texts = [d.text for d in iter_documents([str(folder)])]
    return sum(len(e.ids) for e in tok.encode_batch(texts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablation", help="working folder")
    ap.add_argument("--max-tokens", default="2e6", help="training tokens for each run")
    ap.add_argument("--seed", default="0", help="training seed, the same for both runs")
    ap.add_argument("--workers", type=int, default=2, help="curation worker processes (cores)")
    ap.add_argument("--reuse-curated", action="store_true", help="reuse OUT/curated instead of curating again")
    args = ap.parse_args()
    out = Path(args.out)
    help_text = subprocess.run([sys.executable, "-m", "frugallm", "--help"], capture_output=True, text=True).stdout
    for command in ("curate", "train", "eval"):
        if command not in help_text:
            raise SystemExit(f"`frugallm {command}` is not available in this build; the ablation needs it")

    curated = out / "curated"
    if not args.reuse_curated:
        shutil.rmtree(curated, ignore_errors=True)
    # --json: the report alone on stdout, the progress lines on stderr
    report = json.loads(frugallm("curate", "--out", str(curated), "--workers", str(args.workers), "--json",
                                 capture=True))
    raw = out / "raw"
    if not (raw / "raw.jsonl.gz").is_file():
        write_raw(raw)

    runs = {"raw": out / "run_raw", "curated": out / "run_curated"}
    max_tokens = str(int(float(args.max_tokens)))  # the train command wants an integer
    common = ["--preset", "tiny", "--max-tokens", max_tokens, "--seed", args.seed,
              "--time-budget", "1e9", "--no-progress"]
    started = {}
    for name, data in (("raw", raw), ("curated", curated)):
        shutil.rmtree(runs[name], ignore_errors=True)
        extra = ["--tokenizer", str(runs["raw"] / "tokenizer.json")] if name == "curated" else []
        t0 = time.perf_counter()
        frugallm("train", "--data", str(data), "--out", str(runs[name]), *common, *extra)
        started[name] = time.perf_counter() - t0
    evals = {name: last_json(frugallm("eval", str(run), "--data", str(raw), "--json", capture=True))
             for name, run in runs.items()}

    src_docs = report["source"]["documents"]
    removed_docs = src_docs - report["output"]["documents"]
    regex_in = next(s for s in report["stages"] if s["enabled"])["in"]["tokens"]
    regex_removed = report["removed"]["tokens"]
    bpe_raw = bpe_tokens(runs["raw"] / "tokenizer.json", raw)
    bpe_cur = bpe_tokens(runs["raw"] / "tokenizer.json", curated)
    raw_bpb, cur_bpb = evals["raw"]["val_bpb"], evals["curated"]["val_bpb"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"curation ablation: tiny preset, {float(args.max_tokens):,.0f} training tokens each, "
                        f"seed {args.seed}, evaluated on the raw validation split")
    for col in ("", "raw", "curated", "curated - raw"):
        table.add_column(col, justify="right")
    table.add_row("documents", f"{src_docs:,}", f"{src_docs - removed_docs:,}", f"{-removed_docs:,}")
    table.add_row("tokens (curate's regex count)", f"{regex_in:,}", f"{regex_in - regex_removed:,}",
                  f"{-regex_removed:,}")
    table.add_row("tokens (raw run's BPE)", f"{bpe_raw:,}", f"{bpe_cur:,}", f"{bpe_cur - bpe_raw:,}")
    table.add_row("validation bits per byte", f"{raw_bpb:.4f}", f"{cur_bpb:.4f}", f"{cur_bpb - raw_bpb:+.4f}")
    table.add_row("validation loss (nats/token)", f"{evals['raw']['val_loss']:.4f}",
                  f"{evals['curated']['val_loss']:.4f}",
                  f"{evals['curated']['val_loss'] - evals['raw']['val_loss']:+.4f}")
    table.add_row("lzma -9 bits per byte (same text)", f"{evals['raw']['lzma_bpb']:.4f}",
                  f"{evals['curated']['lzma_bpb']:.4f}", "")
    table.add_row("training wall seconds", f"{started['raw']:.0f}", f"{started['curated']:.0f}", "")
    Console().print(table)
    t = report["timing"]
    print(f"curation: {src_docs:,} documents in {t['seconds']:.1f} s on {t['workers']} workers = "
          f"{t['docs_per_second']:.1f} docs/s")
    print(f"RESULT docs_removed={removed_docs} docs_removed_pct={100 * removed_docs / src_docs:.2f} "
          f"tokens_removed_regex={regex_removed} tokens_removed_bpe={bpe_raw - bpe_cur} "
          f"raw_val_bpb={raw_bpb:.4f} curated_val_bpb={cur_bpb:.4f} bpb_delta={cur_bpb - raw_bpb:+.4f} "
          f"bpb_ratio={cur_bpb / raw_bpb:.4f} curate_docs_per_s={t['docs_per_second']:.1f} "
          f"curate_seconds={t['seconds']:.1f} curate_workers={t['workers']} train_tokens={float(args.max_tokens):.0f}")


if __name__ == "__main__":
    main()
