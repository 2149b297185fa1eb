"""``frugallm lab [CLAIM...] [--budget DURATION] [--seeds N] [--data ...] [--out DIR] [--list]``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from frugallm.errors import ConfigError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h``, ``1.5h`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--budget must be a positive duration such as 600, 10m or 1h, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _positive(flag: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    return n


def _base(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The base arm's model: --preset NAME, --config (a TOML's [model] table, a Hugging Face config.json or a
    directory holding one: ``config.load_model_config``), or the tiny preset."""
    from frugallm.config import load_model_config, preset
    from frugallm.lab.claims import base_model

    if args.preset and args.config:
        raise ConfigError("--preset and --config both name the base model; give one")
    if args.preset:
        return preset(args.preset)
    return load_model_config(args.config) if args.config else base_model()


def run_lab_command(args: argparse.Namespace) -> int:
    import os
    import sys

    from rich.console import Console

    from frugallm.lab.claims import ARMS, arm_costs, select
    from frugallm.lab.report import build_report, write_report
    from frugallm.lab.runner import flops_twins, measure_serving, prepare_plan, run_lab

    console = Console(soft_wrap=True)
    chosen = select(args.claims)
    budget = parse_duration(args.budget)
    seeds = _positive("--seeds", args.seeds, 2)
    nproc = _positive("--nproc", args.nproc, 1)
    seq_len = _positive("--seq-len", args.seq_len, 256)
    batch_size = _positive("--batch-size", args.batch_size, 16)
    base = _base(args)
    if args.list:
        costs = arm_costs(base, seq_len)
        twins = flops_twins(chosen, base, seq_len)
        for c in chosen:
            console.print(f"[bold]{c.name}[/bold]: {c.published['claim']} ({c.published['source']})")
            for a in c.arms:
                k = costs[a]
                twin = f"   equal-FLOPs twin: x{twins[a]:.2f} tokens" if a in twins and a != c.arms[0] else ""
                console.print(f"    {a:<13} {k['train_flops_per_token'] / 1e6:8.1f} MFLOP/token   "
                              f"{k['params_total'] / 1e6:6.2f}M total, {k['params_active'] / 1e6:6.2f}M active   "
                              f"{ARMS[a].note}{twin}")
        return 0
    out = Path(args.out)
    data = list(args.data) if args.data else None
    plan = prepare_plan(out, chosen, seeds=seeds, budget_s=budget, base=base, data=data, seq_len=seq_len,
                        batch_size=batch_size, calibrate=not args.no_probe, nproc=nproc, progress=console.print)
    console.print(f"lab: {len(plan.arms)} arms x {seeds} seeds, {plan.tokens:,} tokens each "
                  f"({len(plan.twin_tokens)} equal-FLOPs twins)"
                  + (f", {plan.nproc} processes per run" if plan.nproc > 1 else "") + f", into {out}")
    live = sys.stderr.isatty() and not os.environ.get("FRUGALLM_NO_PROGRESS")
    run_lab(plan, out, data=data, progress=console.print, live=live)
    measure_serving(plan, out, chosen, progress=console.print)
    write_report(out, build_report(out, plan, chosen, base=base))
    console.print(f"report: {out / 'report.md'}, {out / 'report.json'}, plots in {out / 'plots'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="re-measure DeepSeek's efficiency claims at small scale (docs/lab.md)")
    p.add_argument("claims", nargs="*", metavar="CLAIM",
                   help="moe-vs-dense, mla-vs-mha, balancing, mtp, fp8, curation (default: all)")
    p.add_argument("--budget", default="1h", help="wall-clock budget for the whole lab: 600, 10m, 1h (default 1h)")
    p.add_argument("--seeds", default="2", help="seeds per arm (default 2)")
    p.add_argument("--data", nargs="+", default=None, help="corpus (default: the embedded standard library)")
    p.add_argument("--out", default="runs/lab", help="lab directory (default runs/lab)")
    p.add_argument("--list", action="store_true", help="list the claims, their arms and FLOPs per token")
    p.add_argument("--preset", default=None, help="the base arm's model preset (default tiny; frugallm info --list)")
    p.add_argument("--config", default=None,
                   help="the base arm's model from a run TOML ([model]) or a Hugging Face config.json")
    p.add_argument("--seq-len", default=None, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", default=None, help="sequences per step, over all processes (default 16)")
    p.add_argument("--nproc", default=None,
                   help="processes training each run on this machine (torch's elastic launcher; default 1)")
    p.add_argument("--no-probe", action="store_true",
                   help="plan the horizon at an assumed 0.2 TFLOP/s instead of timing a few steps of each arm")
    p.set_defaults(func=run_lab_command)
