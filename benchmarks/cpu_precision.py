"""The training step in bf16 autocast against the same step in float32, same model and weights, in one process:
whether ``precision = "auto"`` (``frugallm.train.device.resolve_precision``) picks the faster one on this machine.
Prints a table and a final RESULT line.

    .venv/bin/python benchmarks/cpu_precision.py [--preset tiny] [--batch 16] [--seq 256] [--rounds 10]
        [--threads N] [--device cpu]

Each step is forward_train (main and MTP losses), backward and fused AdamW, as ``frugallm train`` runs it
(bf16: autocast over the forward, float32 master weights). The two precisions take turns, two steps each per
round, the second timed; the ratio printed is the median of the per-round ratios with its interquartile range.
``auto`` reads CPU feature flags, not a timing. On a 2-core AMX Xeon (2026-12-01) this script prints bf16 at
1.63x of float32's speed, and at 0.94x (``auto_picks_faster=no``) with the routed experts' row-count buckets
turned off (``FRUGALLM_KERNELS=expert_row_buckets=off``), as they were before: oneDNN then builds a bf16
kernel for most expert GEMMs. Each precision runs the kernel policy ``frugallm train`` chooses for it
(``frugallm.kernels.choose``), with ``$FRUGALLM_KERNELS`` applied to both.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from frugallm.config import preset
from frugallm.kernels import choose, install, override_from_env
from frugallm.model import build_model
from frugallm.train.config import TrainConfig
from frugallm.train.device import resolve_precision
from frugallm.train.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    model = build_model(cfg, device=device, dtype=torch.float32, seed=0)
    kernels = {name: choose(device, name, override_from_env()) for name in ("fp32", "bf16")}
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1 + cfg.num_nextn_predict_layers),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def step(bf16: bool) -> None:
        install(model, kernels["bf16" if bf16 else "fp32"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            res = model.forward_train(ids)
        mtp = torch.stack(res.mtp_losses).mean() if res.mtp_losses else res.loss.new_zeros(())
        (res.loss + 0.3 * mtp).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds + 1):
        for name in times:
            step(name == "bf16")  # untimed: the timed step follows a step in the same precision
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(name == "bf16")
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 1:
                times[name].append(time.perf_counter() - t0)
    per_round = sorted(f / b for f, b in zip(times["fp32"], times["bf16"], strict=True))
    mid = statistics.median(per_round)
    q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    tokens = args.batch * args.seq
    print(f"\n{args.preset}, batch {args.batch} x {args.seq}, {device.type}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds")
    print(f"{'precision':<12}{'s/step':>10}{'tokens/s':>12}")
    for name, t in times.items():
        s = statistics.median(t)
        print(f"{name:<12}{s:>10.3f}{tokens / s:>12.0f}")
    auto = resolve_precision("auto", device)
    faster = "bf16" if mid > 1 else "fp32"
    print(f"bf16 is {mid:.2f}x as fast as fp32 (rounds 25-75%: {q1:.2f}-{q3:.2f}x); auto picks {auto}")
    print(f"RESULT preset={args.preset} device={device.type} bf16_speedup={mid:.2f} auto={auto} "
          f"auto_picks_faster={'yes' if auto == faster else 'no'}")


if __name__ == "__main__":
    main()
