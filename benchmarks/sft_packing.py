"""Supervised fine-tuning packed against padded, same examples, same model and weights, in one process: trained
tokens per second of the training step, several examples to a row (``frugallm.tune.sft.pack``) against one
example a row (``packed=False``). Prints a table and a final RESULT line.

    .venv/bin/python benchmarks/sft_packing.py [--preset tiny] [--layers 2] [--examples 128] [--seq 256]
        [--batch 8] [--rounds 2] [--threads N] [--device cpu]

The examples are the built-in stdlib chat set (``stdlib_chat_rows``: a function's signature and docstring
asked, its body answered), rendered by the default chat template with a byte-level BPE trained here on the
same rows, loss on the answers. Each mode trains on all of them once per round, in ``--batch``-row steps:
forward_train with labels (and segment and position ids where packed; MTP included), backward, AdamW. Padded
batches are cut to their longest example, as a padding collator does, so the padded side pays only for the
padding it cannot avoid. Both modes train the same tokens, so the ratio of trained tokens/s is the ratio of
their times; it is the median of the per-round ratios (modes take turns within a round). The first round is
a warm-up. The kernel policy is ``frugallm train``'s for the device (``$FRUGALLM_KERNELS`` applies).

On the 2-core EPYC development host (2026-12-03, other jobs running) the defaults ran in 43 s and printed
packed 1,636 against padded 1,439 trained tokens/s, 1.14x, where packing computes 1.24x fewer positions: a
packed row is full length (attention's quadratic term), and the segment mask is one more pass over each
causal block's scores. Under heavy contention the per-round ratios spread widely (0.6-1.4x seen): rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from frugallm.config import preset
from frugallm.data.chat import ChatTemplate
from frugallm.data.tokenizer import train_tokenizer
from frugallm.kernels import choose, override_from_env
from frugallm.model import build_model
from frugallm.train.config import TrainConfig
from frugallm.train.optim import build_optimizer
from frugallm.tune.sft import SFTBatch, SFTConfig, load_sft, pack, stdlib_chat_rows

EOS = "<|endoftext|>"
MTP_WEIGHT = 0.3  # the training loop's default lambda; its value only weights a loss that both modes compute


def batches(data: SFTBatch, rows: int, trim: bool) -> list[SFTBatch]:
    """``data`` in steps of ``rows`` rows, each cut to its longest row where ``trim`` (one example a row)."""
    out = []
    for s in range(0, data.input_ids.shape[0], rows):
        part = {k: getattr(data, k)[s : s + rows] for k in ("input_ids", "labels", "segment_ids", "position_ids")}
        if trim:
            width = int((part["segment_ids"] != 0).sum(1).max())
            part = {k: v[:, :width] for k, v in part.items()}
        out.append(SFTBatch(**part))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the preset's when 0)")
    ap.add_argument("--examples", type=int, default=128, help="chat rows trained on per round")
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (examples truncated to it)")
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = stdlib_chat_rows(args.examples)
    tok = train_tokenizer([json.dumps(r) for r in rows], args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data = load_sft([path], tok, ChatTemplate(eos_token=EOS), SFTConfig(max_seq_len=args.seq, val_fraction=0))
    examples = data.train
    pad_id = tok.token_to_id(EOS)
    modes = {"padded": batches(pack(examples, args.seq, pad_id, packed=False), args.batch, trim=True),
             "packed": batches(pack(examples, args.seq, pad_id), args.batch, trim=False)}
    trained = {m: sum(int((b.labels != -100).sum()) for b in bs) for m, bs in modes.items()}
    assert trained["packed"] == trained["padded"] == data.report.trained_tokens

    cfg = preset(args.preset).replace(vocab_size=tok.get_vocab_size())
    if args.layers:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    model = build_model(cfg, device=device, dtype=torch.float32, seed=0,
                        kernels=choose(device, "fp32", override_from_env()))
    opt = build_optimizer(model, TrainConfig(lr=1e-4))

    def epoch(mode: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in modes[mode]:
            b = SFTBatch(**{k: getattr(b, k).to(device) for k in ("input_ids", "labels", "segment_ids",
                                                                   "position_ids")})
            out = model.forward_train(b.input_ids, labels=b.labels, segment_ids=b.segment_ids,
                                      position_ids=b.position_ids, reduction="sum")
            loss = out.loss / out.trained_tokens.clamp(min=1)
            for m, n in zip(out.mtp_losses, out.mtp_trained_tokens, strict=True):
                loss = loss + MTP_WEIGHT / len(out.mtp_losses) * m / n.clamp(min=1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds + 1):
        for mode in modes:
            t = epoch(mode)
            if r >= 1:
                times[mode].append(t)
    ratios = sorted(p / q for p, q in zip(times["padded"], times["packed"], strict=True))
    ratio = statistics.median(ratios)
    shapes = {m: sum(b.input_ids.numel() for b in bs) for m, bs in modes.items()}
    print(f"\n{args.preset} ({cfg.num_hidden_layers} layers), {len(examples)} chat examples <= {args.seq} tokens, "
          f"{args.batch} rows a step, {device.type}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"{'mode':<8}{'steps':>7}{'positions':>11}{'real %':>8}{'s/round':>10}{'trained tok/s':>15}")
    real = data.report.tokens
    for mode, bs in modes.items():
        s = statistics.median(times[mode])
        print(f"{mode:<8}{len(bs):>7}{shapes[mode]:>11}{100 * real / shapes[mode]:>8.1f}{s:>10.2f}"
              f"{trained[mode] / s:>15.0f}")
    print(f"packed trains {ratio:.2f}x the tokens/s of padded (rounds: {ratios[0]:.2f}-{ratios[-1]:.2f}x)")
    print(f"RESULT preset={args.preset} device={device.type} examples={len(examples)} "
          f"packed_tokens_per_s={trained['packed'] / statistics.median(times['packed']):.0f} "
          f"padded_tokens_per_s={trained['padded'] / statistics.median(times['padded']):.0f} "
          f"packed_vs_padded={ratio:.2f}")


if __name__ == "__main__":
    main()
