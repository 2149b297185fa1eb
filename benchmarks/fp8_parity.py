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
``--control`` adds a third run, the peer with a rounding-sized change, whose drift from the peer is the
metric's noise floor at that scale: builtin, initial weights perturbed by 2^-9; cli with an fp32 peer, another
CPU thread count (only the summation order differs); cli with a bf16 peer, the same run in fp32 (bf16 matmuls
sum alike on any thread count here, so that control would be the peer itself; fp32 against bf16 tells how far
the accepted bf16 baseline is from fp32, the yardstick for what FP8 adds on top of it).

``--seeds 0 1 2`` repeats all of it per seed (OUT_DIR/seedN) and also computes the figure on the loss curves
averaged over the seeds: from one seed, two runs that part at the learning-rate ramp end up as two samples of
the training outcome, and their difference is mostly that sampling; the average over seeds shrinks it by
about sqrt(seeds) and leaves what the precision changes.

    python benchmarks/fp8_parity.py --steps 300                      # cli loop, tiny preset
    python benchmarks/fp8_parity.py --steps 300 --batch-size 8 --seq-len 128   # a smaller batch, faster on a CPU
    python benchmarks/fp8_parity.py --steps 300 --control                 # with the noise floor
    python benchmarks/fp8_parity.py --steps 300 --control --seeds 0 1 2   # three seeds and their average
    python benchmarks/fp8_parity.py --steps 300 --reuse                   # re-read finished runs, no training
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from frugallm import fsio

if TYPE_CHECKING:
    from frugallm.config import ModelConfig


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


def run_builtin(precision: str, args: argparse.Namespace, out: Path, perturb: float = 0.0,
                cfg: ModelConfig | None = None, perturb_seed: int | None = None) -> dict[int, float]:
    """One training run of ``cfg`` (default: the ``args.preset`` preset with byte tokens); ``perturb`` > 0
    multiplies every initial weight by (1 + perturb * N(0, 1)), the control run that measures how far two runs
    drift apart from rounding-sized differences alone; ``perturb_seed`` (default ``args.seed + 1``) draws that
    noise."""
    import torch

    from frugallm.config import preset
    from frugallm.model import build_model
    from frugallm.precision import Fp8Recipe, convert_to_fp8

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg is None:
        cfg = preset(args.preset).replace(vocab_size=256)  # byte tokens
    model = build_model(cfg, device=device, seed=args.seed)
    if perturb:
        noise = torch.Generator(device=device).manual_seed(args.seed + 1 if perturb_seed is None else perturb_seed)
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


class Comparison(NamedTuple):
    """Two loss curves over their common steps and the figures of the last ``window`` of them."""

    steps: list[int]
    peer: list[float]
    other: list[float]
    rel: list[float]  # |other - peer| / peer per step
    mean_rel: float  # mean of rel over the window: the figure DeepSeek-V3 reports below 0.25%
    peer_mean: float
    other_mean: float

    @property
    def diff_of_means(self) -> float:
        return abs(self.other_mean - self.peer_mean) / self.peer_mean

    def blocks(self, size: int = 25) -> str:
        signed = [(b - a) / a for a, b in zip(self.peer, self.other, strict=True)]
        return "  ".join(f"{self.steps[i]}-{self.steps[min(i + size, len(signed)) - 1]}: "
                         f"{100 * sum(signed[i : i + size]) / len(signed[i : i + size]):+.2f}"
                         for i in range(0, len(signed), size))


def compare(peer_losses: dict[int, float], other_losses: dict[int, float], window: int) -> Comparison:
    steps = sorted(set(peer_losses) & set(other_losses))
    if len(steps) < window:
        raise SystemExit(f"only {len(steps)} common steps; need at least --window {window}")
    peer = [peer_losses[s] for s in steps]
    other = [other_losses[s] for s in steps]
    rel = [abs(b - a) / a for a, b in zip(peer, other, strict=True)]
    return Comparison(steps, peer, other, rel, sum(rel[-window:]) / window, sum(peer[-window:]) / window,
                      sum(other[-window:]) / window)


def mean_curve(runs: list[dict[int, float]]) -> dict[int, float]:
    """step -> the loss averaged over runs (seeds), on the steps all of them logged."""
    common = set.intersection(*(set(r) for r in runs))
    return {s: sum(r[s] for r in runs) / len(runs) for s in sorted(common)}


def plot(fp8: Comparison, args: argparse.Namespace, path: Path, title: str,
         control: Comparison | None = None, control_label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    top.plot(fp8.steps, fp8.peer, label=args.peer, lw=1)
    top.plot(fp8.steps, fp8.other, label=f"fp8 ({args.backend})", lw=1)
    top.set_ylabel("training loss")
    top.set_title(title)
    top.legend()
    bottom.plot(fp8.steps, [100 * r for r in fp8.rel], lw=0.8, color="gray", label="fp8")
    if control is not None:
        bottom.plot(control.steps, [100 * r for r in control.rel], lw=0.8, color="tab:green", alpha=0.7,
                    label=f"control ({control_label})")
    bottom.axhline(0.25, color="red", lw=0.8, ls="--", label="0.25% (DeepSeek-V3)")
    steps = fp8.steps
    bottom.axvspan(steps[-min(args.window, len(steps))], steps[-1], alpha=0.15, label=f"last {args.window} steps")
    bottom.set_ylabel(f"|run - {args.peer}| / {args.peer} (%)")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    with fsio.atomic_path(path, suffix=".png") as tmp:  # never a half-written figure
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def control_kind(args: argparse.Namespace) -> str | None:
    """Which rounding-sized change the control run makes (module doc), or None without --control."""
    if args.control is None:
        return None
    if args.loop == "builtin":
        return "perturb"
    if args.control != "auto":
        return args.control
    # bf16 matmuls on the CPU (oneDNN) sum in the same order whatever the thread count: two bf16 runs on 1
    # and 2 threads logged bitwise-equal losses here, so a thread-count control of a bf16 peer measures nothing
    return "threads" if args.peer == "fp32" else "fp32"


def run_control(kind: str, args: argparse.Namespace, out: Path) -> tuple[dict[int, float], str]:
    """The control run's losses and what it changed."""
    import copy

    import torch

    if kind == "perturb":
        return run_builtin(args.peer, args, out, perturb=2**-9), f"{args.peer}, initial weights perturbed by 2^-9"
    if kind == "threads":
        other = copy.copy(args)
        other.threads = 1 if (args.threads or torch.get_num_threads()) != 1 else 2
        return (run_cli(args.peer, other, out),
                f"{args.peer} on {other.threads} thread(s) instead of {args.threads or torch.get_num_threads()}")
    return run_cli("fp32", args, out), f"fp32 instead of {args.peer}"


def print_table(c: Comparison, args: argparse.Namespace) -> None:
    every = max(1, len(c.steps) // 10)
    print(f"\n{'step':>6} {args.peer + ' loss':>10} {'fp8 loss':>10} {'rel diff %':>10}")
    for i in list(range(0, len(c.steps), every)) + ([len(c.steps) - 1] if (len(c.steps) - 1) % every else []):
        print(f"{c.steps[i]:>6} {c.peer[i]:>10.4f} {c.other[i]:>10.4f} {100 * c.rel[i]:>10.3f}")
    print(f"last {args.window} steps: mean {args.peer} {c.peer_mean:.4f}, mean fp8 {c.other_mean:.4f}; "
          f"mean relative difference {100 * c.mean_rel:.3f}% (difference of the means {100 * c.diff_of_means:.3f}%)")
    print(f"signed difference (fp8 - peer) / peer, mean per 25-step block, %: {c.blocks()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--window", type=int, default=50, help="last steps averaged for the figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="several seeds: each pair (and control) runs in OUT_DIR/seedN, and the figure is also "
                        "computed on the loss curves averaged over the seeds")
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
    p.add_argument("--control", nargs="?", const="auto", default=None, choices=("auto", "threads", "fp32"),
                   help="a third run with a rounding-sized change, whose drift from the peer is the metric's noise "
                        "floor: threads (cli: another CPU thread count, only the summation order differs), fp32 "
                        "(cli, bf16 peer: the peer in fp32, how far the bf16 baseline is from fp32 itself); auto: "
                        "threads for an fp32 peer, fp32 for a bf16 one; the builtin loop perturbs the initial "
                        "weights by 2^-9")
    p.add_argument("--out-dir", type=Path, default=Path("runs/fp8_parity"), help="where runs, PNG and JSON go")
    p.add_argument("--reuse", action="store_true",
                   help="cli loop: read runs already finished in --out-dir with the same settings instead of "
                        "training them again (to re-analyse, or to finish an interrupted comparison)")
    args = p.parse_args(argv)
    if args.loop == "auto":
        args.loop = "cli" if importlib.util.find_spec("frugallm.train.cli") else "builtin"
    import copy

    import torch

    from frugallm.train.device import resolve_precision

    outer = resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.peer == "auto":
        args.peer = outer
    elif args.loop == "cli" and args.peer != outer:
        p.error(f"on this device `frugallm train --precision fp8` computes in {outer} outside its GEMMs; "
                f"a {args.peer} peer would compare two things at once: use --peer {outer} (or auto)")
    kind = control_kind(args)
    if kind == "threads" and torch.cuda.is_available():
        p.error("--control threads changes the CPU thread count; on a GPU use --loop builtin")
    if kind == "fp32" and args.peer == "fp32":
        p.error("--control fp32 needs a bf16 peer; an fp32 peer's control is another thread count (threads)")
    print(f"peer: {args.peer}; fp8 run: FP8 GEMMs, {args.peer if args.loop == 'builtin' else outer} elsewhere",
          flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_cli if args.loop == "cli" else run_builtin
    seeds = args.seeds or [args.seed]
    start = time.perf_counter()
    per_seed, curves = [], {"peer": [], "fp8": [], "control": []}
    control_what = ""
    for seed in seeds:
        sargs = copy.copy(args)
        sargs.seed = seed
        sdir = args.out_dir if len(seeds) == 1 else args.out_dir / f"seed{seed}"
        peer_losses = run(args.peer, sargs, sdir / args.peer)
        fp8_losses = run("fp8", sargs, sdir / "fp8")
        curves["peer"].append(peer_losses)
        curves["fp8"].append(fp8_losses)
        fp8 = compare(peer_losses, fp8_losses, args.window)
        control = None
        if kind is not None:
            control_losses, control_what = run_control(kind, sargs, sdir / "control")
            curves["control"].append(control_losses)
            control = compare(peer_losses, control_losses, args.window)
        print(f"\n== seed {seed}")
        print_table(fp8, args)
        if control is not None:
            print(f"control ({control_what}): mean relative difference {100 * control.mean_rel:.3f}% over the same "
                  f"steps (difference of the means {100 * control.diff_of_means:.3f}%)")
        sdir.mkdir(parents=True, exist_ok=True)
        plot(fp8, args, sdir / "fp8_parity.png", f"FP8 vs {args.peer}: {args.preset}, seed {seed}, {args.loop} loop",
             control, control_what)
        per_seed.append({"seed": seed, "mean_rel_diff": fp8.mean_rel, "diff_of_means": fp8.diff_of_means,
                         "peer_mean": fp8.peer_mean, "fp8_mean": fp8.other_mean,
                         "control_rel_diff": control.mean_rel if control else None,
                         "control_diff_of_means": control.diff_of_means if control else None})
    headline = compare(mean_curve(curves["peer"]), mean_curve(curves["fp8"]), args.window)
    headline_control = (compare(mean_curve(curves["peer"]), mean_curve(curves["control"]), args.window)
                        if curves["control"] else None)
    if len(seeds) > 1:
        print(f"\n== the loss curves averaged over seeds {', '.join(map(str, seeds))}")
        print_table(headline, args)
        print(f"\n{'seed':>6} {'fp8 %':>8} {'fp8 means %':>12} {'control %':>10} {'control means %':>16}"
              "   (mean relative difference over the window; difference of the window means)")
        for r in per_seed:
            cr, cm = r["control_rel_diff"], r["control_diff_of_means"]
            print(f"{r['seed']:>6} {100 * r['mean_rel_diff']:>8.3f} {100 * r['diff_of_means']:>12.3f} "
                  + (f"{100 * cr:>10.3f} {100 * cm:>16.3f}" if cr is not None else ""))
        print(f"{'mean':>6} {100 * headline.mean_rel:>8.3f} {100 * headline.diff_of_means:>12.3f} "
              + (f"{100 * headline_control.mean_rel:>10.3f} {100 * headline_control.diff_of_means:>16.3f}"
                 if headline_control else "") + "   (of the seed-averaged curves)")
        plot(headline, args, args.out_dir / "fp8_parity.png",
             f"FP8 vs {args.peer}: {args.preset}, mean of seeds {', '.join(map(str, seeds))}, {args.loop} loop",
             headline_control, control_what)
    elif headline_control is not None:
        print(f"control ({control_what}): the noise floor of this metric at this scale")
    summary = {"steps": len(headline.steps), "window": args.window, "peer": args.peer, "loop": args.loop,
               "preset": args.preset, "backend": args.backend, "seeds": seeds, "control": control_what or None,
               "per_seed": per_seed, "mean_rel_diff": headline.mean_rel, "diff_of_means": headline.diff_of_means,
               "peer_mean": headline.peer_mean, "fp8_mean": headline.other_mean,
               "control_rel_diff": headline_control.mean_rel if headline_control else None,
               "elapsed_s": round(time.perf_counter() - start, 1)}
    fsio.write_json(args.out_dir / "fp8_parity.json", summary)
    print(f"wrote {args.out_dir / 'fp8_parity.png'}")
    per = ",".join(f"{100 * r['mean_rel_diff']:.3f}" for r in per_seed)
    print(f"RESULT fp8_rel_loss_diff_pct={100 * headline.mean_rel:.3f} window={args.window} "
          f"steps={len(headline.steps)} peer={args.peer} loop={args.loop} preset={args.preset} "
          f"backend={args.backend} seeds={len(seeds)} below_0.25pct={'yes' if headline.mean_rel < 0.0025 else 'no'}"
          + (f" per_seed_pct={per}" if len(seeds) > 1 else "")
          + (f" control_rel_diff_pct={100 * headline_control.mean_rel:.3f}" if headline_control else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
