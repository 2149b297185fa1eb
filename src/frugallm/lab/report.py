"""``DIR/report.json`` and ``DIR/report.md``: every figure read from the arms' run directories.

Per arm and seed: the final validation loss over the whole held-out split (``metrics.jsonl``, the record
marked final), its wall seconds and tokens per second (``cost.json``), the expert load of its last training
record (max/mean and dead experts, per MoE layer, averaged), and its training FLOPs per token from the cost
model. Per claim: each figure as mean ± spread over seeds (``stats``), and for the claim's arm against each
other arm a verdict on validation loss at equal tokens, plus the training loss at equal FLOPs (each arm's
curve read at the largest FLOPs every arm reached, linearly between records) and at equal wall-clock seconds.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from frugallm import fsio
from frugallm.config import ModelConfig
from frugallm.lab import stats
from frugallm.lab.claims import ARMS, Claim, arm_costs, base_model
from frugallm.lab.runner import LabPlan, is_finished, run_dir


def _records(path: Path) -> list[dict[str, Any]]:
    with open(path / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _at(curve: list[tuple[float, float]], x: float) -> float:
    """The curve's y at x, linear between its points; nan outside them."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return float("nan")


def arm_figures(path: Path, flops_per_token: float) -> dict[str, Any]:
    recs = _records(path)
    final = next(r for r in reversed(recs) if r.get("final"))
    train = [r for r in recs if "loss" in r and "val_loss" not in r]
    cost = json.loads((path / "cost.json").read_text(encoding="utf-8"))
    fig: dict[str, Any] = {"val_loss": final["val_loss"], "val_bpb": final["val_bpb"], "tokens": final["tokens"],
                           "wall_s": cost["wall_seconds"],
                           "flops": final["tokens"] * flops_per_token,
                           "curve_flops": [(r["tokens"] * flops_per_token, r["loss"]) for r in train],
                           "curve_seconds": [(r["elapsed_s"], r["loss"]) for r in train]}
    last = train[-1] if train else {}
    serve = path / "serve.json"  # lab.serving's decode figures, seed 0 of the arms that serve
    if serve.is_file():
        fig.update({k: v for k, v in json.loads(serve.read_text(encoding="utf-8")).items()
                    if k in ("decode_tokens_per_s", "speculative_tokens_per_s", "acceptance_rate",
                             "speculative_speedup", "context")})
    if "load_max_over_mean" in last:
        fig["load_max_over_mean"] = sum(last["load_max_over_mean"]) / len(last["load_max_over_mean"])
        fig["dead_experts"] = sum(last["dead_experts"]) / len(last["dead_experts"])
    return fig


def build_report(out: Path, plan: LabPlan, claims: list[Claim], base: ModelConfig | None = None) -> dict[str, Any]:
    base = base or base_model()
    costs = arm_costs(base, plan.seq_len)
    figs: dict[str, list[dict[str, Any]]] = {}
    for arm in plan.arms:
        runs = [run_dir(out, arm, s) for s in range(plan.seeds)]
        figs[arm] = [arm_figures(p, costs[arm]["train_flops_per_token"]) for p in runs if is_finished(p)]
    report: dict[str, Any] = {"host": f"{platform.node()} {platform.processor() or platform.machine()}",
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "plan": dict(plan.__dict__), "claims": {}}
    for claim in claims:
        if any(not figs[a] for a in claim.arms):
            report["claims"][claim.name] = {"published": claim.published, "verdicts": [],
                                            "verdict": stats.NOT_MEASURABLE, "why": "an arm has no finished run"}
            continue
        # the last point every arm's logged curve reaches (the final step may fall between log records)
        common_flops = min(f["curve_flops"][-1][0] for a in claim.arms for f in figs[a])
        common_s = min(f["curve_seconds"][-1][0] for a in claim.arms for f in figs[a])
        arms: dict[str, Any] = {}
        for a in claim.arms:
            rows = figs[a]
            entry = {k: stats.estimate([r[k] for r in rows]).as_dict()
                     for k in ("val_loss", "val_bpb", "wall_s", "load_max_over_mean", "dead_experts") if k in rows[0]}
            entry["train_loss_at_equal_flops"] = stats.estimate(
                [_at(r["curve_flops"], common_flops) for r in rows]).as_dict()
            entry["train_loss_at_equal_seconds"] = stats.estimate(
                [_at(r["curve_seconds"], common_s) for r in rows]).as_dict()
            entry["train_flops_per_token"] = costs[a]["train_flops_per_token"]
            entry["params_total"], entry["params_active"] = costs[a]["params_total"], costs[a]["params_active"]
            entry["seeds"] = len(rows)
            for k in ("decode_tokens_per_s", "speculative_tokens_per_s", "acceptance_rate", "speculative_speedup",
                      "context"):
                if k in rows[0]:  # measured on seed 0 only: a figure of one run, no spread
                    entry[k] = rows[0][k]
            if claim.name == "mla-vs-mha":
                from frugallm.cost.memory import kv_cache_bytes_per_token

                entry["kv_bytes_per_token_bf16"] = kv_cache_bytes_per_token(ARMS[a].model_config(base), "bf16")
            arms[a] = entry
        verdicts = []
        head = claim.arms[0]
        for other in claim.arms[1:]:
            for key, label in (("val_loss", "validation loss, equal tokens"),
                               ("train_loss_at_equal_flops", "training loss, equal FLOPs"),
                               ("train_loss_at_equal_seconds", "training loss, equal wall-clock seconds")):
                a, b = (stats.Estimate(**{**arms[x][key], "spread": arms[x][key]["spread"]
                                          if arms[x][key]["spread"] is not None else math.nan})
                        for x in (head, other))
                v, why = stats.verdict(a, b) if not (math.isnan(a.mean) or math.isnan(b.mean)) else \
                    (stats.NOT_MEASURABLE, "the curves do not reach the common point")
                verdicts.append({"arm": head, "against": other, "figure": label, "verdict": v, "why": why})
        report["claims"][claim.name] = {"published": claim.published, "arms": arms, "verdicts": verdicts,
                                        "equal_flops": common_flops, "equal_seconds": common_s}
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    fsio.write_text(out / "report.json", json.dumps(report, indent=1))
    fsio.write_text(out / "report.md", render_markdown(report))


def _fmt(e: dict[str, Any] | None) -> str:
    if not e:
        return ""
    return f"{e['mean']:.4f}" + (f" ± {e['spread']:.4f}" if e.get("spread") is not None else "")


def render_markdown(report: dict[str, Any]) -> str:
    p = report["plan"]
    lines = ["# frugallm lab report", "",
             f"Host {report['host']}, {report['date']}. {p['seeds']} seed(s) per arm, {p['tokens']:,} training "
             f"tokens per arm (seq {p['seq_len']} x batch {p['batch_size']}), budget {p['budget_s']:.0f} s. "
             "Figures are mean ± sample standard deviation over seeds.", ""]
    for name, c in report["claims"].items():
        pub = c["published"]
        lines += [f"## {name}", "", f"Claim: {pub['claim']}. Published: {pub['figure']} ({pub['source']}).", ""]
        if "arms" in c:
            lines += ["| arm | val loss | val bpb | train loss @ equal FLOPs | train loss @ equal s | wall s | "
                      "train FLOPs/token | load max/mean | dead experts | KV bytes/token |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for a, e in c["arms"].items():
                lines.append(f"| {a} | {_fmt(e.get('val_loss'))} | {_fmt(e.get('val_bpb'))} | "
                             f"{_fmt(e.get('train_loss_at_equal_flops'))} | {_fmt(e.get('train_loss_at_equal_seconds'))}"
                             f" | {_fmt(e.get('wall_s'))} | {e['train_flops_per_token']:.3e} | "
                             f"{_fmt(e.get('load_max_over_mean'))} | {_fmt(e.get('dead_experts'))} | "
                             f"{e.get('kv_bytes_per_token_bf16', '')} |")
            lines.append("")
            for a, e in c["arms"].items():
                if "decode_tokens_per_s" in e:
                    lines.append(f"- {a}: {e['decode_tokens_per_s']:.1f} decode tokens/s after a {e['context']}-token "
                                 "context (serving engine, greedy, one stream, seed 0)"
                                 + (f"; MTP drafting {e['speculative_tokens_per_s']:.1f} tokens/s "
                                    f"(x{e['speculative_speedup']:.2f}), acceptance {e['acceptance_rate']:.0%}"
                                    if "speculative_speedup" in e else ""))
            lines.append("")
        for v in c["verdicts"]:
            lines.append(f"- {v['arm']} vs {v['against']}, {v['figure']}: **{v['verdict']}** ({v['why']})")
        if not c["verdicts"]:
            lines.append(f"- **{c['verdict']}**: {c['why']}")
        lines.append("")
    return "\n".join(lines)
