"""``frugallm train`` and ``frugallm eval``."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from frugallm.errors import ConfigError
from frugallm.kernels.policy import KERNELS_ENV

NO_PROGRESS_ENV = "FRUGALLM_NO_PROGRESS"  # read here only: set, no live progress line (tests, logs)
# set by ``frugallm lab --nproc`` for the runs it launches: the progress line's label and the budget's end
PROGRESS_LABEL_ENV, PROGRESS_DEADLINE_ENV = "FRUGALLM_PROGRESS_LABEL", "FRUGALLM_PROGRESS_DEADLINE"


def progress_from_env() -> tuple[str | None, float | None]:
    """The live line's label and deadline (epoch seconds) a launching lab passed, or (None, None)."""
    label = os.environ.get(PROGRESS_LABEL_ENV) or None
    try:
        deadline = float(os.environ[PROGRESS_DEADLINE_ENV])
    except (KeyError, ValueError):
        deadline = None
    return label, deadline

# flags that override TrainConfig fields: (flag, field, type, help)
_TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--time-budget", "time_budget_s", float, "training time budget in seconds (default 600)"),
    ("--max-steps", "max_steps", int, "stop after this many optimizer steps"),
    ("--max-tokens", "max_tokens", float, "stop after this many training tokens (e.g. 2e6)"),
    ("--seed", "seed", int, "random seed (model init, data order)"),
    ("--precision", "precision", str, "auto | fp32 | bf16 | fp8 (default auto: bf16 where it is faster)"),
    ("--fp8-backend", "fp8_backend", str, "auto | emulated | hopper"),
    ("--adam-moments", "adam_moments", str, "fp32 | bf16: AdamW's two moments, 8 or 4 bytes per parameter "
     "(default fp32)"),
    ("--batch-size", "batch_size", int, "sequences per optimizer step, global"),
    ("--seq-len", "seq_len", int, "tokens per sequence"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--mtp-lambda", "mtp_lambda", float, "weight of the multi-token-prediction loss"),
    ("--balance-alpha", "balance_alpha", float, "weight of the sequence-wise balance loss"),
    ("--bias-gamma", "bias_gamma", float, "expert-bias update speed per step"),
    ("--aux-loss-alpha", "aux_loss_alpha", float, "weight of the classic batch-wise auxiliary balance loss "
     "(default 0, off; Switch Transformer used 1e-2)"),
    ("--price-per-hour", "price_per_hour", float, "device price in $ per device-hour"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--threads", "threads", int, "CPU threads"),
    ("--eval-every", "eval_every_s", float, "seconds between validation passes"),
    ("--checkpoint-every", "checkpoint_every_s", float, "seconds between checkpoints"),
    ("--log-every", "log_every", int, "steps between metric records"),
    ("--tokenizer", "tokenizer", str, "use this tokenizer.json instead of training one"),
    ("--text-field", "text_field", str, "JSON/parquet field holding the text (default text)"),
    ("--ep", "ep", int, "expert-parallel processes: routed experts split across this many ranks (default 1)"),
    ("--dp", "dp", int, "data-parallel size of the dp x ep mesh (default: processes / ep)"),
]


def _resolve_configs(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from frugallm.config import load_model_config, preset
    from frugallm.train.config import TrainConfig
    from frugallm.train.runconfig import read_run_config

    if args.resume:
        model_cfg, train_cfg = read_run_config(Path(args.resume) / "config.toml") \
            if (Path(args.resume) / "config.toml").is_file() else (None, None)
        if model_cfg is None:
            raise ConfigError(f"--resume {args.resume}: no config.toml there; not a frugallm run directory")
    elif args.config:
        path = Path(args.config)
        if path.suffix == ".toml" and path.is_file():
            model_cfg, train_cfg = read_run_config(path)
        else:  # an HF config.json or a directory holding one
            model_cfg, train_cfg = load_model_config(path), TrainConfig()
    else:
        model_cfg, train_cfg = preset(args.preset or "tiny"), TrainConfig()
    if args.preset and (args.config or args.resume):
        raise ConfigError("--preset cannot be combined with --config or --resume")
    changes: dict[str, Any] = {}
    for _flag, field, typ, _help in _TRAIN_FLAGS:
        v = getattr(args, field)
        if v is not None:
            changes[field] = int(float(v)) if field == "max_tokens" else typ(v)
    if args.data:
        changes["data"] = list(args.data)
    if args.activation_checkpointing:
        changes["activation_checkpointing"] = True
    if args.fp8_saved_activations:
        changes["fp8_saved_activations"] = True
    if args.max_steps is not None or args.max_tokens is not None:
        if args.time_budget_s is None:
            changes["time_budget_s"] = None  # an explicit step/token horizon replaces the default budget
    return model_cfg, train_cfg.replace(**changes) if changes else train_cfg


def _run_dir(args: argparse.Namespace) -> Path:
    if args.resume:
        return Path(args.resume)
    if args.out:
        return Path(args.out)
    base = Path("runs") / "default"
    n = 1
    out = base
    while (out / "checkpoints").exists():  # never overwrite an earlier default run
        n += 1
        out = base.with_name(f"default-{n}")
    return out


def launcher_command(nproc: int, argv: list[str]) -> list[str]:
    """This command again, without --nproc, under torch's elastic launcher on this machine (--standalone picks
    a free rendezvous port). Multi-node runs call torchrun directly (docs/scaling.md)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "frugallm", *rest]


def run_train(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return subprocess.call(launcher_command(args.nproc, sys.argv[1:]))
    from rich.console import Console

    from frugallm.kernels import override_from_env
    from frugallm.train.distributed import rank_errors
    from frugallm.train.loop import Trainer

    with rank_errors():  # under torchrun, each rank's error carries its rank
        model_cfg, train_cfg = _resolve_configs(args)
        run_dir = _run_dir(args)
        progress = not args.no_progress and os.environ.get(NO_PROGRESS_ENV) is None
        label, deadline = progress_from_env()
        trainer = Trainer(model_cfg, train_cfg, run_dir, resume=bool(args.resume), progress=progress,
                          kernel_override=override_from_env(), progress_label=label, deadline=deadline)
        console = Console()
        if trainer.dist.is_main:
            console.print(f"run directory: {run_dir}   device: {trainer.device}   precision: "
                          f"{trainer.precision_label}   {trainer.dist.describe()}")
            console.print("kernels: " + ", ".join(f"{k} {v}" for k, v, _ in trainer.kernels.describe())
                          + "   (frugallm info --kernels says why)")
            console.print(trainer.memory_summary())
        result = trainer.run()
        trainer.dist.close()  # every rank is done with collectives; rank 0 only prints from here
    if not trainer.dist.is_main:
        return 0
    latest = run_dir.parent / "latest"
    try:
        if latest.is_symlink() or not latest.exists():
            latest.unlink(missing_ok=True)
            latest.symlink_to(run_dir.name)
    except OSError:
        pass
    if result.interrupted:
        console.print(f"interrupted at step {result.step}; checkpoint written. Continue with: "
                      f"frugallm train --resume {run_dir}")
        return 0
    f, c = result.final, result.cost
    console.print(f"steps {result.step}   tokens {result.tokens:,}   {result.elapsed_s:.0f} s   "
                  f"{c.get('tokens_per_second', 0):,.0f} tokens/s")
    console.print(f"validation: loss {f['val_loss']:.4f}   perplexity {f['val_ppl']:.2f}   "
                  f"bits per byte {f['val_bpb']:.4f}")
    mfu = c.get("mfu")
    console.print(f"cost: {c.get('device_hours', 0):.4f} {c.get('device_kind')}-hours   "
                  f"{c.get('achieved_tflops', 0):.3f} TFLOP/s achieved"
                  + (f"   MFU {mfu * 100:.1f}%" if mfu else "")
                  + (f"   ${c['cost_usd']:.4f} at ${c['price_per_device_hour']:.2f}/device-hour"
                     if c.get("cost_usd") is not None else "   (no price: pass --price-per-hour to count $)"))
    from frugallm.cost.memory import format_bytes

    console.print(f"memory: estimate {format_bytes(c['memory_estimate']['total'])} per device; measured peak "
                  f"{format_bytes(c['memory_peak_bytes'])} ({c['memory_peak_source']})")
    if (run_dir / "model").is_dir():
        from frugallm.train.sample import sample_text

        console.print("sample:", style="bold")
        console.print(sample_text(run_dir, "def ", max_new_tokens=64, seed=train_cfg.seed))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from frugallm.data.pack import prepare_corpus
    from frugallm.rundir import load_model
    from frugallm.train.evaluate import evaluate, lzma_bpb
    from frugallm.train.runconfig import read_run_config

    run_dir = Path(args.run_dir)
    if _sft_eval(args, run_dir):
        return _run_eval_sft(args, run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir}: no config.toml; not a frugallm run directory (a Hugging Face directory is "
                          f"evaluated on conversations: --data FILE.jsonl)")
    model_cfg, train_cfg = read_run_config(run_dir / "config.toml")
    data = list(args.data) if args.data else train_cfg.data
    corpus = prepare_corpus(data, vocab_size=model_cfg.vocab_size, tokenizer_path=run_dir / "tokenizer.json",
                            text_field=train_cfg.text_field, val_fraction=train_cfg.val_fraction,
                            progress=not args.json, cache_dir=run_dir.parent / ".cache" / "data")
    model = load_model(run_dir)[0]
    res = evaluate(model, corpus, seq_len=train_cfg.seq_len, max_windows=args.max_windows)
    res["lzma_bpb"] = lzma_bpb(corpus)
    if args.json:
        print(json.dumps(res))
        return 0
    table = Table(title=f"{run_dir} on the validation split ({res['val_tokens']:,} tokens)")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("loss (nats/token)", f"{res['val_loss']:.4f}")
    table.add_row("perplexity", f"{res['val_ppl']:.2f}")
    table.add_row("bits per byte", f"{res['val_bpb']:.4f}")
    table.add_row("lzma -9 bits per byte (same text)", f"{res['lzma_bpb']:.4f}")
    Console().print(table)
    return 0


def _sft_eval(args: argparse.Namespace, run_dir: Path) -> bool:
    """Conversation data (or a fine-tuning run without --data) is evaluated on its trained tokens."""
    from frugallm.tune.finetune import BUILTIN, looks_like_sft, read_finetune_config

    if args.data:
        return list(args.data) == [BUILTIN] or looks_like_sft(list(args.data))
    return read_finetune_config(run_dir) is not None


def _run_eval_sft(args: argparse.Namespace, run_dir: Path) -> int:
    from rich.console import Console
    from rich.table import Table

    from frugallm.tune.finetune import evaluate_sft

    res = evaluate_sft(run_dir, list(args.data) if args.data else None, split=args.split,
                       val_fraction=args.val_fraction, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(res))
        return 0
    which = "held-out rows (hash split)" if res["split"] == "val" else "every row"
    table = Table(title=f"{run_dir} on the trained tokens of {res['rows']} {which}: {res['val_tokens']:,} tokens")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("loss (nats/token)", f"{res['val_loss']:.4f}")
    table.add_row("perplexity", f"{res['val_ppl']:.2f}")
    table.add_row("rows refused (malformed, too long)", str(res["refused"]))
    Console().print(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: the tiny preset on the embedded corpus, 10 min)")
    p.add_argument("--preset", default=None, help="model preset (default tiny); see frugallm info --list")
    p.add_argument("--config", default=None, help="run TOML ([model], [train]) or a Hugging Face config.json")
    p.add_argument("--data", nargs="+", default=None, help="text files, directories, globs, .jsonl, .parquet")
    p.add_argument("--out", default=None, help="run directory (default runs/default)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (torch elastic launcher)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--fp8-saved-activations", action="store_true",
                   help="with --precision fp8: keep linear inputs for the backward in e4m3 (about 1 byte each)")
    p.add_argument("--no-progress", action="store_true",
                   help=f"no live progress line (also with ${NO_PROGRESS_ENV} set); ${KERNELS_ENV} overrides "
                        "the kernels chosen for the device, e.g. gemm=torch,attention=sdpa")
    for flag, field, _typ, help_ in _TRAIN_FLAGS:
        p.add_argument(flag, dest=field, default=None, help=help_)
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a run (with lzma's); "
                       "on conversations (.jsonl), the loss on the assistant tokens")
    e.add_argument("run_dir", help="a frugallm run directory, or any model directory with --data FILE.jsonl")
    e.add_argument("--data", nargs="+", default=None,
                   help="evaluate on this corpus's validation split; .jsonl conversations ({messages} or "
                        "{prompt, completion} rows) or builtin:stdlib-chat: the loss on their trained tokens")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--split", default="val", choices=("val", "all"),
                   help="conversation data: the rows fine-tuning holds out by hash (val, default) or all rows")
    e.add_argument("--val-fraction", type=float, default=None,
                   help="conversation data: the held-out share (default the run's, else 0.05)")
    e.add_argument("--seq-len", type=int, default=None, help="conversation data: tokens per sequence")
    e.set_defaults(func=run_eval)
