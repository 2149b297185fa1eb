"""``frugallm rl``: GRPO with verifiable rewards (``rl.trainer``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from frugallm.errors import ConfigError

# fine-tuning's training flags that RL takes too (the data and sequence ones it does not)
_SKIP = {"tokenizer", "text_field", "seq_len", "batch_size", "mtp_lambda", "ep", "dp"}
# (flag, RLConfig field, type, help)
_RL_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--group-size", "group_size", int, "samples per prompt, G (default 8)"),
    ("--prompts-per-step", "prompts_per_step", int, "prompts per step, P (default 4)"),
    ("--max-new-tokens", "max_new_tokens", int, "tokens sampled per answer at most (default 48)"),
    ("--temperature", "temperature", float, "rollout sampling temperature (default 1.0)"),
    ("--top-p", "top_p", float, "rollout nucleus sampling (default 1.0)"),
    ("--kl-coef", "kl_coef", float, "beta of the k3 KL to the reference (default 0: no reference kept; R1 0.001)"),
    ("--clip-eps", "clip_low", float, "ratio clip epsilon, lower side (default 0.2)"),
    ("--clip-high", "clip_high", float, "ratio clip epsilon, upper side (default 0.2; DAPO's clip-higher 0.28)"),
    ("--aggregation", "aggregation", str, "token-mean (default, DAPO) | seq-mean (GRPO paper) | dr-grpo"),
    ("--epochs", "epochs", int, "optimisation passes over each batch of rollouts, K (default 1)"),
    ("--heldout", "heldout", int, "held-out prompts scored greedily (default 64)"),
    ("--sandbox-timeout", "sandbox_timeout_s", float, "seconds a completion's code may run (default 5)"),
]


def _resolve(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from frugallm.rl.trainer import RLConfig, read_rl_config, rl_train_defaults
    from frugallm.train.runconfig import read_run_config
    from frugallm.tune.cli import _train_flags
    from frugallm.tune.finetune import FinetuneConfig, read_finetune_config

    if args.resume:
        ft, rl = read_finetune_config(args.resume), read_rl_config(args.resume)
        if ft is None or rl is None:
            raise ConfigError(f"--resume {args.resume}: not an RL run directory (no config.toml with [rl])")
        train_cfg = read_run_config(Path(args.resume) / "config.toml")[1]
    else:
        if not args.base:
            raise ConfigError("--from PATH is required: a Hugging Face directory, the published DeepSeek FP8 "
                              "layout or a frugallm run (e.g. runs/finetune)")
        if not args.task:
            raise ConfigError("--task is required: arithmetic, countdown, python, or a .jsonl of prompts with "
                              "--reward module:function")
        ft = FinetuneConfig(base=args.base, method=args.method or "lora")
        rl = RLConfig(task=args.task, reward=args.reward)
        train_cfg = rl_train_defaults(ft.method)
    changes = {name: v for name, v in (("method", args.method), ("lora_rank", args.lora_rank),
                                        ("lora_alpha", args.lora_alpha)) if v is not None}
    if args.lora_targets:
        changes["lora_targets"] = list(args.lora_targets)
    ft = ft.replace(**changes) if changes else ft
    rchanges = {field: typ(getattr(args, field)) for _f, field, typ, _h in _RL_FLAGS
                if getattr(args, field) is not None}
    if args.no_std_scaling:
        rchanges["scale_std"] = False
    if rchanges:
        rl = RLConfig.from_dict({**rl.to_dict(), **rchanges})
    tchanges: dict[str, Any] = {}
    for _flag, field, typ, _help in _train_flags():
        if field in _SKIP:
            continue
        v = getattr(args, field)
        if v is not None:
            tchanges[field] = int(float(v)) if field == "max_tokens" else typ(v)
    if (args.max_steps is not None or args.max_tokens is not None) and args.time_budget_s is None:
        tchanges["time_budget_s"] = None
    if not args.resume:  # one micro-batch holds a step's sequences unless --grad-accum splits it
        tchanges.setdefault("batch_size", rl.prompts_per_step * rl.group_size)
    return ft, rl, train_cfg.replace(**tchanges) if tchanges else train_cfg


def _write_warmup(args: argparse.Namespace) -> int:
    """Chat rows with the task's formatted solutions, for a supervised warm-up through ``frugallm finetune``."""
    from frugallm import fsio
    from frugallm.rl.tasks import build_task, warmup_rows

    task = build_task(args.task, reward=args.reward)
    rows = warmup_rows(task, args.warmup_rows)
    fsio.write_text(Path(args.write_warmup), "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} warm-up conversations of task {args.task} (training prompts only) to "
          f"{args.write_warmup}")
    return 0


def run_rl(args: argparse.Namespace) -> int:
    from rich.console import Console

    from frugallm.kernels import override_from_env
    from frugallm.rl.trainer import GRPOTrainer
    from frugallm.train.cli import NO_PROGRESS_ENV

    if args.write_warmup:
        return _write_warmup(args)
    ft, rl, train_cfg = _resolve(args)
    run_dir = Path(args.resume or args.out or "runs/rl")
    progress = not args.no_progress and os.environ.get(NO_PROGRESS_ENV) is None
    trainer = GRPOTrainer(ft, rl, train_cfg, run_dir, resume=bool(args.resume), progress=progress,
                          kernel_override=override_from_env())
    console = Console()
    console.print(f"run directory: {run_dir}   base: {ft.base}   task: {rl.task}   method: {ft.method}   "
                  f"device: {trainer.device}   precision: {trainer.precision_label}")
    result = trainer.run()
    console.print(trainer.report_lines(result), highlight=False, markup=False)
    if result.interrupted:
        console.print(f"interrupted at step {result.step}; checkpoint written. Continue with: "
                      f"frugallm rl --resume {run_dir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from frugallm.tune.cli import _train_flags

    p = sub.add_parser("rl", help="reinforcement learning with verifiable rewards (GRPO)")
    p.add_argument("--from", dest="base", default=None, metavar="PATH",
                   help="the starting model: a frugallm run (e.g. a fine-tuning run), a Hugging Face directory")
    p.add_argument("--task", default=None, help="arithmetic | countdown | python | a .jsonl of prompt rows")
    p.add_argument("--reward", default=None, metavar="MODULE:FUNCTION",
                   help="a user task's reward (row, completion) -> float, run in a limited subprocess")
    p.add_argument("--method", choices=("lora", "full"), default=None, help="lora (default) or full")
    p.add_argument("--lora-rank", type=int, default=None, help="adapter rank r (default 16)")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha (default 32)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="PATTERN", help="module patterns to adapt")
    for flag, field, typ, help_ in _RL_FLAGS:  # typed here: a bad number is argparse's one-line error
        p.add_argument(flag, dest=field, type=typ, default=None, help=help_)
    p.add_argument("--no-std-scaling", action="store_true",
                   help="advantages without the division by the group's std (Dr. GRPO)")
    p.add_argument("--out", default=None, help="run directory (default runs/rl)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an RL run")
    p.add_argument("--write-warmup", default=None, metavar="FILE.jsonl",
                   help="write the task's formatted solutions as chat rows for a supervised warm-up, and exit")
    p.add_argument("--warmup-rows", type=int, default=2000, help="rows --write-warmup writes (default 2000)")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    for flag, field, _typ, help_ in _train_flags():
        if field not in _SKIP:
            p.add_argument(flag, dest=field, default=None, help=help_)
    p.set_defaults(func=run_rl)
