"""``frugallm finetune`` and ``frugallm merge``. (``frugallm eval --data FILE.jsonl`` lives with eval in
``train.cli`` and calls ``evaluate_sft`` here.)"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from frugallm.errors import ConfigError

# training flags of ``frugallm train`` that fine-tuning takes too (the corpus and tokenizer ones it does not)
_SKIP = {"tokenizer", "text_field"}


def _train_flags() -> list[tuple[str, str, Any, str]]:
    from frugallm.train.cli import _TRAIN_FLAGS

    return [f for f in _TRAIN_FLAGS if f[1] not in _SKIP]


def _resolve(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from frugallm.train.runconfig import read_run_config
    from frugallm.tune.finetune import FinetuneConfig, read_finetune_config, train_defaults

    if args.resume:
        ft = read_finetune_config(args.resume)
        if ft is None:
            raise ConfigError(f"--resume {args.resume}: not a fine-tuning run directory (no config.toml with "
                              f"[finetune])")
        train_cfg = read_run_config(Path(args.resume) / "config.toml")[1]
    else:
        if not args.base:
            raise ConfigError("--from PATH is required: a Hugging Face directory, the published DeepSeek FP8 layout "
                              "or a frugallm run (e.g. runs/latest)")
        ft = FinetuneConfig(base=args.base, method=args.method or "lora")
        train_cfg = train_defaults(ft.method)
    changes: dict[str, Any] = {}
    for name, value in (("data", args.data), ("method", args.method), ("lora_rank", args.lora_rank),
                        ("lora_alpha", args.lora_alpha), ("lora_dropout", args.lora_dropout),
                        ("lora_targets", args.lora_targets), ("train_on", args.train_on),
                        ("overflow", args.overflow), ("val_fraction", args.val_fraction),
                        ("fp8_base", args.fp8_base)):
        if value is not None:
            changes[name] = list(value) if name in ("data", "lora_targets") else value
    if args.no_packing:
        changes["packed"] = False
    if args.train_router:
        changes["freeze_router"] = False
    if args.update_bias:
        changes["update_bias"] = True
    if args.resume and args.base and Path(args.base).resolve() != Path(ft.base).resolve():
        raise ConfigError(f"--from {args.base} differs from the run's base {ft.base}")
    ft = ft.replace(**changes) if changes else ft
    tchanges: dict[str, Any] = {}
    for _flag, field, typ, _help in _train_flags():
        v = getattr(args, field)
        if v is not None:
            tchanges[field] = int(float(v)) if field == "max_tokens" else typ(v)
    if args.activation_checkpointing:
        tchanges["activation_checkpointing"] = True
    if args.fp8_saved_activations:
        tchanges["fp8_saved_activations"] = True
    if (args.max_steps is not None or args.max_tokens is not None) and args.time_budget_s is None:
        tchanges["time_budget_s"] = None
    return ft, train_cfg.replace(**tchanges) if tchanges else train_cfg


def _run_dir(args: argparse.Namespace) -> Path:
    if args.resume:
        return Path(args.resume)
    if args.out:
        return Path(args.out)
    out, n = Path("runs") / "finetune", 1
    while (out / "checkpoints").exists():
        n += 1
        out = out.with_name(f"finetune-{n}")
    return out


def run_finetune(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from frugallm.train.cli import launcher_command

        return subprocess.call(launcher_command(args.nproc, sys.argv[1:]))
    from rich.console import Console

    from frugallm.kernels import override_from_env
    from frugallm.train.cli import NO_PROGRESS_ENV
    from frugallm.train.distributed import rank_errors
    from frugallm.tune.finetune import FineTuner

    with rank_errors():
        ft, train_cfg = _resolve(args)
        run_dir = _run_dir(args)
        progress = not args.no_progress and os.environ.get(NO_PROGRESS_ENV) is None
        tuner = FineTuner(ft, train_cfg, run_dir, resume=bool(args.resume), progress=progress,
                          kernel_override=override_from_env())
        console = Console()
        if tuner.dist.is_main:
            console.print(f"run directory: {run_dir}   base: {ft.base}   method: {ft.method}   device: "
                          f"{tuner.device}   precision: {tuner.precision_label}   {tuner.dist.describe()}")
            console.print(tuner.memory_summary())
        result = tuner.run()
        tuner.dist.close()
    if not tuner.dist.is_main:
        return 0
    console.print(tuner.report_lines(result))
    if result.interrupted:
        console.print(f"interrupted at step {result.step}; checkpoint written. Continue with: "
                      f"frugallm finetune --resume {run_dir}")
        return 0
    if args.sample:
        from frugallm.tune.finetune import compare_samples

        for line in compare_samples(ft.base, run_dir, tuner.sample_prompt(), max_tokens=args.sample_tokens):
            console.print(line, highlight=False, markup=False)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from frugallm.tune.merge import merge_run

    report = merge_run(args.run_dir, args.out, fp8=args.fp8)
    for line in report:
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune open weights on your conversations (LoRA or full)")
    p.add_argument("--from", dest="base", default=None, metavar="PATH",
                   help="the base: a Hugging Face DeepSeek-architecture directory (bf16 or the published FP8 "
                        "layout), transformers' save_pretrained output, or a frugallm run (runs/latest)")
    p.add_argument("--data", nargs="+", default=None,
                   help=".jsonl files of {messages: [...]}, {prompt, completion} or {text} rows (default: the "
                        "built-in stdlib chat set)")
    p.add_argument("--method", choices=("lora", "full"), default=None, help="lora (default) or full")
    p.add_argument("--lora-rank", type=int, default=None, help="adapter rank r (default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha; updates scale alpha/r "
                   "(default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="PATTERN",
                   help="module name patterns to adapt (default: MLA projections, MLPs, shared and routed "
                        "experts; see docs/finetune.md)")
    p.add_argument("--train-on", choices=("assistant", "last", "all"), default=None,
                   help="which tokens carry the loss: every assistant turn (default), the last one, all")
    p.add_argument("--overflow", choices=("truncate", "drop"), default=None,
                   help="rows longer than --seq-len: truncate (default) or drop")
    p.add_argument("--no-packing", action="store_true", help="one conversation per sequence, padded")
    p.add_argument("--val-fraction", type=float, default=None, help="rows held out by hash (default 0.05)")
    p.add_argument("--train-router", action="store_true", help="let the MoE router train (frozen by default)")
    p.add_argument("--update-bias", action="store_true",
                   help="keep the auxiliary-loss-free bias update on (off by default when fine-tuning)")
    p.add_argument("--fp8-base", choices=("auto", "keep", "dequantize"), default=None,
                   help="an FP8 base under LoRA: keep its e4m3 weights (auto, the default) or dequantize")
    p.add_argument("--out", default=None, help="run directory (default runs/finetune)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a fine-tuning run")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (torch elastic launcher)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--fp8-saved-activations", action="store_true",
                   help="with --precision fp8: keep linear inputs for the backward in e4m3")
    p.add_argument("--no-sample", dest="sample", action="store_false",
                   help="skip the before/after sample answer at the end")
    p.add_argument("--sample-tokens", type=int, default=96, help="tokens of the before/after sample answer")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    for flag, field, _typ, help_ in _train_flags():
        p.add_argument(flag, dest=field, default=None, help=help_)
    p.set_defaults(func=run_finetune)

    m = sub.add_parser("merge", help="fold a LoRA run's adapter into its base: a Hugging Face directory")
    m.add_argument("run_dir", help="a LoRA fine-tuning run directory")
    m.add_argument("--out", required=True, help="the merged Hugging Face directory to write")
    m.add_argument("--fp8", action="store_true",
                   help="requantize to the base's block-scaled FP8 layout (e4m3 + weight_scale_inv) and print "
                        "the requantization error")
    m.set_defaults(func=run_merge)
