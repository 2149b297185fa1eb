"""Training-loss parity of the FP8 recipe against its higher-precision peer, measured in the same run.

Two trainings from the same seed on the same batches, one in the device's fast high precision (the peer: BF16
autocast on GPUs and CPUs with native bf16, FP32 on CPUs that only emulate bf16, where BF16 would run ~10x
slower) and one with the FP8 recipe (FP8 GEMMs, the peer's precision elsewhere); the figure is the mean over the last ``--window`` steps of
|loss_fp8 - loss_peer| / loss_peer, which DeepSeek-V3 reports below 0.25% (arXiv 2412.19437, section 3.3).
It writes both loss curves to a PNG and a JSON summary, prints a table and a final ``RESULT`` line.

Loops:
  cli      the real training loop, twice: ``frugallm train --preset P --precision {PEER,fp8} --max-steps N
           --seed S --out RUN_DIR --log-every 1`` (reads RUN_DIR/metrics.jsonl records with step and loss)
  builtin  a minimal loop kept here (AdamW, warmup + cosine, MTP and balance losses, bias updates) on bytes of
           the running Python's standard library, with the preset's vocabulary cut to 256 byte tokens; it
           takes any ``--peer``.
``--control`` adds a third run, the peer again with a rounding-sized change (builtin: initial weights
perturbed by 2^-9; cli: another CPU thread count, so only the summation order differs): its drift from the
peer is the metric's noise floor at that scale.

    python benchmarks/fp8_parity.py --steps 300                      # cli loop, tiny preset
    python benchmarks/fp8_parity.py --steps 300 --batch-size 8 --seq-len 128   # a smaller batch, faster on a CPU
    python benchmarks/fp8_parity.py --steps 300 --control                 # with the noise floor
    python benchmarks/fp8_parity.py --steps 300 --reuse                   # re-read finished runs, no training
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl (evaluation records carry no 'loss')."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            losses[int(rec["step"])] = float(rec["loss"])
    return losses


def reusable(precision: str, args: argparse.Namespace, out: Path) -> dict[int, float] | None:
    """With --reuse: the losses of a finished ``frugallm train`` run in ``out`` whose config.toml matches this
    command (preset, precision, seed, steps, batch, sequence length, threads, learning rate), else None."""
    if not (args.reuse and (out / "config.toml").is_file() and (out / "metrics.jsonl").is_file()):
        return None
    from frugallm.config import preset
    from frugallm.errors import ConfigError
    from frugallm.train.config import TrainConfig
    from frugallm.train.runconfig import read_run_config

    try:
        model_cfg, train_cfg = read_run_config(out / "config.toml")
    except ConfigError as e:
        print(f"--reuse: {out}/config.toml is unreadable ({e}): training again", flush=True)
        return None
    want = {"precision": precision, "seed": args.seed, "max_steps": args.steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "threads": args.threads,
            "lr": TrainConfig().lr if args.lr is None else args.lr}
    differ = [f"{k}={getattr(train_cfg, k)!r} (want {v!r})" for k, v in want.items()
              if v is not None and getattr(train_cfg, k) != v]
    if model_cfg != preset(args.preset):
        differ.append(f"model is not the {args.preset} preset")
    losses = read_losses(out)
    if not losses or max(losses) < args.steps:
        differ.append(f"{max(losses, default=0)} of {args.steps} steps logged")
    if differ:
        print(f"--reuse: {out} does not match ({'; '.join(differ)}): training again", flush=True)
        return None
    print(f"--reuse: reading the {len(losses)} logged steps of {out}", flush=True)
    return losses


def run_cli(precision: str, args: argparse.Namespace, out: Path) -> dict[int, float]:
    reused = reusable(precision, args, out)
    if reused is not None:
        return reused
    cmd = [sys.executable, "-m", "frugallm", "train", "--preset", args.preset, "--precision", precision,
           "--max-steps", str(args.steps), "--seed", str(args.seed), "--out", str(out), "--log-every", "1",
           "--no-progress"]
    if precision == "fp8":
        cmd += ["--fp8-backend", args.backend]
    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--threads", args.threads),
                        ("--lr", args.lr)):
        if value is not None:
            cmd += [flag, str(value)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return read_losses(out)


def stdlib_bytes(limit: int = 8 << 20) -> bytes:
    """Deterministic text: the standard library's .py files in sorted order, up to ``limit`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"\n".join(chunks)


def run_builtin(precision: str, args: argparse.Namespace, out: Path, perturb: float = 0.0) -> dict[int, float]:
    """One training run; ``perturb`` > 0 multiplies every initial weight by (1 + perturb * N(0, 1)), the
    control run that measures how far two runs drift apart from rounding-sized differences alone."""
    import torch

    from frugallm.config import preset
    from frugallm.model import build_model
    from frugallm.precision import Fp8Recipe, convert_to_fp8

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = preset(args.preset).replace(vocab_size=256)  # byte tokens
    model = build_model(cfg, device=device, seed=args.seed)
    if perturb:
        noise = torch.Generator(device=device).manual_seed(args.seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=noise, device=device))
    if precision == "fp8":
        convert_to_fp8(model, Fp8Recipe(backend=args.backend))
    autocast_dtype = torch.bfloat16 if args.peer == "bf16" else None
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    peak_lr = 3e-3 if args.lr is None else args.lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95))
    text = torch.frombuffer(bytearray(stdlib_bytes()), dtype=torch.uint8)
    B, S = args.batch_size or 8, args.seq_len or 128
    window = S + 1 + cfg.num_nextn_predict_layers
    gen = torch.Generator().manual_seed(args.seed)  # the same batches for both runs
    warmup = max(1, args.steps // 15)
    out.mkdir(parents=True, exist_ok=True)
    losses: dict[int, float] = {}
    start = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(1, args.steps + 1):
            frac = (step - warmup) / max(1, args.steps - warmup)
            lr = peak_lr * (step / warmup if step <= warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            starts = torch.randint(0, len(text) - window, (B,), generator=gen)
            tokens = torch.stack([text[i : i + window] for i in starts.tolist()]).long().to(device)  # [B, window]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                res = model.forward_train(tokens)
            mtp = torch.stack(res.mtp_losses).mean() if res.mtp_losses else res.loss.new_zeros(())
            (res.loss + 0.3 * mtp + 1e-4 * res.balance_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if res.loads is not None:
                model.update_expert_bias(res.loads, 1e-3)
            losses[step] = res.loss.item()
            f.write(json.dumps({"step": step, "loss": losses[step], "lr": lr}) + "\n")
            if step % 25 == 0 or step == args.steps:
                print(f"  [{precision}] step {step}/{args.steps} loss {losses[step]:.4f} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return losses


def plot(steps: list[int], peer: list[float], fp8: list[float], rel: list[float], args: argparse.Namespace,
         path: Path, control_rel: list[float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    top.plot(steps, peer, label=args.peer, lw=1)
    top.plot(steps, fp8, label=f"fp8 ({args.backend})", lw=1)
    top.set_ylabel("training loss")
    top.set_title(f"FP8 vs {args.peer}: {args.preset}, seed {args.seed}, {args.loop} loop")
    top.legend()
    bottom.plot(steps, [100 * r for r in rel], lw=0.8, color="gray", label="fp8")
    if control_rel:
        bottom.plot(steps, [100 * r for r in control_rel], lw=0.8, color="tab:green", alpha=0.7,
                    label=f"control ({args.peer} again, rounding-sized change)")
    bottom.axhline(0.25, color="red", lw=0.8, ls="--", label="0.25% (DeepSeek-V3)")
    bottom.axvspan(steps[-min(args.window, len(steps))], steps[-1], alpha=0.15, label=f"last {args.window} steps")
    bottom.set_ylabel("|fp8 - peer| / peer (%)")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)  # never a half-written figure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--window", type=int, default=50, help="last steps averaged for the figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--loop", choices=("auto", "cli", "builtin"), default="auto",
                   help="auto: the real training loop when frugallm.train is installed")
    p.add_argument("--peer", choices=("auto", "bf16", "fp32"), default="auto",
                   help="precision of the reference run; auto: the one the fp8 run keeps outside its GEMMs on "
                        "this device (bf16 where it is native, fp32 on CPUs that emulate bf16)")
    p.add_argument("--backend", default="auto", help="fp8 backend: auto | emulated | hopper")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (builtin default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (builtin default 128)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the training loop's, 3e-3; the builtin loop's is the same)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--control", action="store_true",
                   help="a third run, the peer with a rounding-sized change (builtin: initial weights perturbed "
                        "by 2^-9; cli: another CPU thread count), whose drift is the metric's noise floor")
    p.add_argument("--out-dir", type=Path, default=Path("runs/fp8_parity"), help="where runs, PNG and JSON go")
    p.add_argument("--reuse", action="store_true",
                   help="cli loop: read runs already finished in --out-dir with the same settings instead of "
                        "training them again (to re-analyse, or to finish an interrupted comparison)")
    args = p.parse_args(argv)
    if args.loop == "auto":
        args.loop = "cli" if importlib.util.find_spec("frugallm.train.cli") else "builtin"
    import torch

    from frugallm.train.loop import resolve_precision

    outer = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.peer == "auto":
        args.peer = outer
    elif args.loop == "cli" and args.peer != outer:
        p.error(f"on this device `frugallm train --precision fp8` computes in {outer} outside its GEMMs; "
                f"a {args.peer} peer would compare two things at once: use --peer {outer} (or auto)")
    print(f"peer: {args.peer}; fp8 run: FP8 GEMMs, {args.peer if args.loop == 'builtin' else outer} elsewhere",
          flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_cli if args.loop == "cli" else run_builtin
    start = time.perf_counter()
    peer_losses = run(args.peer, args, args.out_dir / args.peer)
    fp8_losses = run("fp8", args, args.out_dir / "fp8")
    control_losses: dict[int, float] = {}
    if args.control and args.loop == "builtin":
        control_what = "its initial weights perturbed by 2^-9"
        control_losses = run_builtin(args.peer, args, args.out_dir / "control", perturb=2**-9)
    elif args.control and torch.cuda.is_available():
        p.error("--control with the cli loop changes the CPU thread count; on a GPU use --loop builtin")
    elif args.control:  # the real loop: the same run on another thread count, so only summation order differs
        import copy

        other = copy.copy(args)
        other.threads = 1 if (args.threads or torch.get_num_threads()) != 1 else 2
        control_what = f"{other.threads} thread(s) instead of {args.threads or torch.get_num_threads()}"
        control_losses = run_cli(args.peer, other, args.out_dir / "control")
    steps = sorted(set(peer_losses) & set(fp8_losses))
    if len(steps) < args.window:
        print(f"only {len(steps)} common steps; need at least --window {args.window}", file=sys.stderr)
        return 1
    peer = [peer_losses[s] for s in steps]
    fp8 = [fp8_losses[s] for s in steps]
    rel = [abs(b - a) / a for a, b in zip(peer, fp8, strict=True)]
    last = slice(len(steps) - args.window, len(steps))
    mean_rel = sum(rel[last]) / args.window
    peer_mean, fp8_mean = sum(peer[last]) / args.window, sum(fp8[last]) / args.window
    every = max(1, len(steps) // 10)
    print(f"\n{'step':>6} {args.peer + ' loss':>10} {'fp8 loss':>10} {'rel diff %':>10}")
    for i in list(range(0, len(steps), every)) + ([len(steps) - 1] if (len(steps) - 1) % every else []):
        print(f"{steps[i]:>6} {peer[i]:>10.4f} {fp8[i]:>10.4f} {100 * rel[i]:>10.3f}")
    print(f"last {args.window} steps: mean {args.peer} {peer_mean:.4f}, mean fp8 {fp8_mean:.4f}; "
          f"mean relative difference {100 * mean_rel:.3f}% (difference of the means "
          f"{100 * abs(fp8_mean - peer_mean) / peer_mean:.3f}%)")
    signed = [(b - a) / a for a, b in zip(peer, fp8, strict=True)]
    blocks = [(steps[i : i + 25], signed[i : i + 25]) for i in range(0, len(steps), 25)]
    print("signed difference (fp8 - peer) / peer, mean per 25-step block, %: "
          + "  ".join(f"{ss[0]}-{ss[-1]}: {100 * sum(d) / len(d):+.2f}" for ss, d in blocks))
    control_rel = None
    if control_losses:
        last_steps = steps[last]
        control_rel = sum(abs(control_losses[s] - peer_losses[s]) / peer_losses[s] for s in last_steps) / args.window
        print(f"control ({args.peer} with {control_what}): mean relative difference "
              f"{100 * control_rel:.3f}% over the same steps, the noise floor of this metric at this scale")
    png = args.out_dir / "fp8_parity.png"
    control_curve = ([abs(control_losses[s] - peer_losses[s]) / peer_losses[s] for s in steps]
                     if control_losses else None)
    plot(steps, peer, fp8, rel, args, png, control_curve)
    summary = {"steps": len(steps), "window": args.window, "peer": args.peer, "loop": args.loop,
               "preset": args.preset, "backend": args.backend, "seed": args.seed,
               "mean_rel_diff": mean_rel, "peer_mean": peer_mean, "fp8_mean": fp8_mean, "control_rel_diff": control_rel,
               "elapsed_s": round(time.perf_counter() - start, 1)}
    tmp = args.out_dir / "fp8_parity.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, args.out_dir / "fp8_parity.json")
    print(f"wrote {png}")
    print(f"RESULT fp8_rel_loss_diff_pct={100 * mean_rel:.3f} window={args.window} steps={len(steps)} "
          f"peer={args.peer} loop={args.loop} preset={args.preset} backend={args.backend} "
          f"below_0.25pct={'yes' if mean_rel < 0.0025 else 'no'}"
          + (f" control_rel_diff_pct={100 * control_rel:.3f}" if control_rel is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
