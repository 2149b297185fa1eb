"""``frugallm info``: a configuration's shape and parameter counts, computed without allocating weights, and
(``--kernels``) the kernel policy a run would use on this host."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from frugallm.config import PRESET_SOURCES, PRESETS, ModelConfig, load_model_config, preset
from frugallm.cost.params import param_counts


def resolve_config(args: argparse.Namespace) -> ModelConfig:
    if getattr(args, "config", None):
        return load_model_config(args.config)
    return preset(getattr(args, "preset", None) or "tiny")


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def show_kernels(args: argparse.Namespace, console: Console) -> int:
    """The kernel policy for --device (default: what ``frugallm train`` picks here) at --precision (default:
    what ``auto`` resolves to there), with ``$FRUGALLM_KERNELS`` applied, and why each choice."""
    import torch

    from frugallm.kernels import choose, override_from_env
    from frugallm.train.device import pick_device, resolve_precision

    device = torch.device(args.device) if args.device else pick_device("auto")
    precision = args.precision or resolve_precision("auto", device)
    kernels = choose(device, precision, override_from_env())
    if args.json:
        print(json.dumps({**kernels.as_dict(), "why": dict(kernels.reasons)}, indent=2))
        return 0
    table = Table(title=f"kernels for {kernels.device}, {kernels.precision}")
    for col in ("kernel", "choice", "why"):
        table.add_column(col)
    for name, value, why in kernels.describe():
        table.add_row(name, value, why)
    console.print(table)
    return 0


def run_info(args: argparse.Namespace) -> int:
    console = Console()
    if args.kernels:
        return show_kernels(args, console)
    if args.list:
        table = Table(title="presets")
        for col in ("name", "total", "active", "source"):
            table.add_column(col)
        for name in PRESETS:
            c = param_counts(preset(name))
            table.add_row(name, _human(c.total), _human(c.active), PRESET_SOURCES[name])
        console.print(table)
        return 0
    cfg = resolve_config(args)
    counts = param_counts(cfg)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "params": counts.as_dict()}, indent=2))
        return 0
    table = Table(title=f"{args.preset or args.config}: {cfg.attention.upper()} attention, "
                        f"{'MoE' if cfg.ffn == 'moe' else 'dense'} FFN, {cfg.num_hidden_layers} layers")
    table.add_column("parameters")
    table.add_column("count", justify="right")
    table.add_column("exact", justify="right")
    rows = [("total (MTP excluded)", counts.total), ("active per token", counts.active),
            ("active per token, embedding excluded", counts.active_non_embedding),
            ("embedding", counts.embedding), ("output head", counts.output_head),
            ("MTP modules (own parameters)", counts.mtp), ("total with MTP", counts.total_with_mtp)]
    for label, n in rows:
        table.add_row(label, _human(n), f"{n:,}")
    console.print(table)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a configuration and its parameter counts")
    p.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--config", default=None, help="a frugallm TOML, a Hugging Face config.json, or a directory")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--kernels", action="store_true",
                   help="the kernel policy a run uses (attention path, GEMM library, expert padding, head "
                        "blocks) and why; $FRUGALLM_KERNELS=key=value,... overrides it")
    p.add_argument("--device", default=None, help="with --kernels: cpu or cuda (default: this host's)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp8"),
                   help="with --kernels: the run's precision (default: what auto picks on the device)")
    p.set_defaults(func=run_info)
