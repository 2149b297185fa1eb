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


def _seeds(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {text!r}")
    return n


def run_lab_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from frugallm.lab.claims import ARMS, arm_costs, base_model, select
    from frugallm.lab.report import build_report, write_report
    from frugallm.lab.runner import make_plan, measure_serving, run_lab

    console = Console()
    chosen = select(args.claims)
    budget = parse_duration(args.budget)
    seeds = _seeds(args.seeds)
    if args.list:
        costs = arm_costs(base_model(), 256)
        for c in chosen:
            console.print(f"[bold]{c.name}[/bold]: {c.published['claim']} ({c.published['source']})")
            for a in c.arms:
                k = costs[a]
                console.print(f"    {a:<13} {k['train_flops_per_token'] / 1e6:8.1f} MFLOP/token   "
                              f"{k['params_total'] / 1e6:6.2f}M total, {k['params_active'] / 1e6:6.2f}M active   "
                              f"{ARMS[a].note}")
        return 0
    if any(ARMS[a].curated for c in chosen for a in c.arms):
        raise ConfigError("the curation claim is not wired into the lab runner yet; name the other claims "
                          "(benchmarks/curation_ablation.py measures it)")
    plan = make_plan(chosen, seeds=seeds, budget_s=budget)
    out = Path(args.out)
    _check_same_plan(out, plan)
    console.print(f"lab: {len(plan.arms)} arms x {seeds} seeds, {plan.tokens:,} tokens each, into {out}")
    run_lab(plan, out, data=list(args.data) if args.data else None, progress=console.print)
    measure_serving(plan, out, chosen, progress=console.print)
    write_report(out, build_report(out, plan, chosen))
    console.print(f"report: {out / 'report.md'}, {out / 'report.json'}")
    return 0


def _check_same_plan(out: Path, plan: object) -> None:
    """A lab started again must be the same lab: its finished arms were trained to the old horizon."""
    import json

    saved = out / "plan.json"
    if saved.is_file():
        old = json.loads(saved.read_text(encoding="utf-8"))
        new = json.loads(json.dumps(plan.__dict__))
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            raise ConfigError(f"{out} holds a lab with another plan ({', '.join(diff)} differ); rerun it with "
                              f"the same claims, --budget and --seeds, or choose another --out")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="re-measure DeepSeek's efficiency claims at small scale (docs/lab.md)")
    p.add_argument("claims", nargs="*", metavar="CLAIM",
                   help="moe-vs-dense, mla-vs-mha, balancing, mtp, fp8, curation (default: all)")
    p.add_argument("--budget", default="1h", help="wall-clock budget for the whole lab: 600, 10m, 1h (default 1h)")
    p.add_argument("--seeds", default="2", help="seeds per arm (default 2)")
    p.add_argument("--data", nargs="+", default=None, help="corpus (default: the embedded standard library)")
    p.add_argument("--out", default="runs/lab", help="lab directory (default runs/lab)")
    p.add_argument("--list", action="store_true", help="list the claims, their arms and FLOPs per token")
    p.set_defaults(func=run_lab_command)
