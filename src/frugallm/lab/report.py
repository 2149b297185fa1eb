"""``DIR/report.json``, ``DIR/report.md`` and ``DIR/plots/CLAIM.png``: every figure read from the arms' run
directories.

Per arm and seed: the final validation loss over the whole held-out split (``metrics.jsonl``, the record
marked final; for a curated arm its evaluation on the raw corpus's split, ``raw_eval.json``), its wall seconds
(``cost.json``), the expert load of its last training record (max/mean and dead experts, per MoE layer,
averaged), and its training FLOPs per token from the cost model. Per claim: each figure as mean ± spread over
seeds (``stats``), and for the claim's arm against each other arm a verdict on validation loss at equal tokens,
on validation loss at equal FLOPs (the equal-FLOPs twin runs, ``runner.flops_twins``), and on training loss at
equal wall-clock seconds (each arm's curve read at the last second every arm's curve reaches, linearly between
records). The plots: training loss against FLOPs and against seconds, every run of the claim.
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
from frugallm.lab.claims import ARMS, Claim, arm_costs
from frugallm.lab.runner import SERVED, TWIN, LabPlan, is_finished, run_dir


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
    raw = path / "raw_eval.json"  # a curated arm, judged on the raw corpus's held-out split
    if raw.is_file():
        got = json.loads(raw.read_text(encoding="utf-8"))
        fig.update(val_loss=got["val_loss"], val_bpb=got["val_bpb"], evaluated_on="the raw corpus's held-out split")
    if "load_max_over_mean" in last:
        fig["load_max_over_mean"] = sum(last["load_max_over_mean"]) / len(last["load_max_over_mean"])
        fig["dead_experts"] = sum(last["dead_experts"]) / len(last["dead_experts"])
    return fig


def build_report(out: Path, plan: LabPlan, claims: list[Claim], base: ModelConfig | None = None) -> dict[str, Any]:
    base = base or plan.base_config()
    costs = arm_costs(base, plan.seq_len)
    figs: dict[str, list[dict[str, Any]]] = {}
    for arm in plan.arms:
        runs = [run_dir(out, arm, s) for s in range(plan.seeds)]
        figs[arm] = [arm_figures(p, costs[arm.removesuffix(TWIN)]["train_flops_per_token"]) for p in runs
                     if is_finished(p)]
    report: dict[str, Any] = {"host": _host(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "plan": plan.as_dict(), "claims": {},
                              "base": {"hidden_size": base.hidden_size, "layers": base.num_hidden_layers,
                                       "params_total": costs["base"]["params_total"],
                                       "params_active": costs["base"]["params_active"]}}
    for claim in claims:
        if any(not figs[a] for a in claim.arms):
            report["claims"][claim.name] = {"published": claim.published, "verdicts": [],
                                            "verdict": stats.NOT_MEASURABLE, "why": "an arm has no finished run"}
            continue
        # the last second every arm's logged curve reaches (the final step may fall between log records)
        common_s = min(f["curve_seconds"][-1][0] for a in claim.arms for f in figs[a])
        arms: dict[str, Any] = {}
        for a in claim.arms:
            rows = figs[a]
            entry = {k: stats.estimate([r[k] for r in rows]).as_dict()
                     for k in ("val_loss", "val_bpb", "wall_s", "load_max_over_mean", "dead_experts") if k in rows[0]}
            twin = a + TWIN if a + TWIN in figs and figs[a + TWIN] else None
            at_flops = figs[twin] if twin else rows  # within the tolerance, the equal-token run is it
            entry["val_loss_at_equal_flops"] = stats.estimate([r["val_loss"] for r in at_flops]).as_dict()
            entry["equal_flops_tokens"] = at_flops[0]["tokens"]
            entry["equal_flops_run"] = "separate run" if twin else "the equal-tokens run"
            if "evaluated_on" in rows[0]:
                entry["evaluated_on"] = rows[0]["evaluated_on"]
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
                               ("val_loss_at_equal_flops", "validation loss, equal FLOPs"),
                               ("train_loss_at_equal_seconds", "training loss, equal wall-clock seconds")):
                a, b = (stats.Estimate(**{**arms[x][key], "spread": arms[x][key]["spread"]
                                          if arms[x][key]["spread"] is not None else math.nan})
                        for x in (head, other))
                v, why = stats.verdict(a, b) if not (math.isnan(a.mean) or math.isnan(b.mean)) else \
                    (stats.NOT_MEASURABLE, "the curves do not reach the common point")
                verdicts.append({"arm": head, "against": other, "figure": label, "verdict": v, "why": why})
        report["claims"][claim.name] = {
            "published": claim.published, "arms": arms, "verdicts": verdicts, "equal_seconds": common_s,
            "equal_flops": plan.tokens * costs[head]["train_flops_per_token"],
            "curves": {run: [{"flops": f["curve_flops"], "seconds": f["curve_seconds"]} for f in figs[run]]
                       for a in claim.arms for run in (a, a + TWIN) if figs.get(run)}}
    return report


def _host() -> str:
    import os

    from frugallm.kernels.host import cpu_model

    return f"{cpu_model() or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def write_report(out: Path, report: dict[str, Any]) -> None:
    for name, claim in report["claims"].items():
        if claim.get("curves"):
            claim["plot"] = str(write_plot(out / "plots" / f"{name}.png", name, claim["curves"]).relative_to(out))
    fsio.write_text(out / "report.json", json.dumps(report, indent=1))
    fsio.write_text(out / "report.md", render_markdown(report))


def write_plot(path: Path, title: str, curves: dict[str, list[dict[str, Any]]]) -> Path:
    """Training loss against FLOPs (left) and against wall-clock seconds (right), every run of a claim: one
    colour per arm, one line per seed, equal-FLOPs twins dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours: dict[str, Any] = {}
    for run, seeds in curves.items():
        arm = run.removesuffix(TWIN)
        colour = colours.setdefault(arm, f"C{len(colours)}")
        for i, c in enumerate(seeds):
            style = dict(color=colour, linestyle="--" if run.endswith(TWIN) else "-", alpha=0.85, linewidth=1.2,
                         label=(f"{arm} (equal FLOPs)" if run.endswith(TWIN) else arm) if i == 0 else None)
            if c["flops"]:
                left.plot(*zip(*c["flops"], strict=True), **style)
            if c["seconds"]:
                right.plot(*zip(*c["seconds"], strict=True), **style)
    left.set_xlabel("training FLOPs (cost model)")
    right.set_xlabel("wall-clock seconds of training")
    left.set_ylabel("training loss (nats/token)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"{title}: training loss, every seed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


def _fmt(e: dict[str, Any] | None) -> str:
    if not e:
        return ""
    return f"{e['mean']:.4f}" + (f" ± {e['spread']:.4f}" if e.get("spread") is not None else "")


def render_markdown(report: dict[str, Any]) -> str:
    p = report["plan"]
    lines = ["# frugallm lab report", "",
             f"Host {report['host']}, {report['date']}. {p['seeds']} seed(s) per arm, {p['tokens']:,} training "
             f"tokens per arm (seq {p['seq_len']} x batch {p['batch_size']}), budget {p['budget_s']:.0f} s. "
             "Figures are mean ± sample standard deviation over seeds."
             + (f" Base arm: hidden {b['hidden_size']}, {b['layers']} layers, {b['params_total'] / 1e6:.2f}M "
                f"parameters ({b['params_active'] / 1e6:.2f}M active)." if (b := report.get("base")) else "")
             + (f" Each run trained by {p['nproc']} processes." if p.get("nproc", 1) > 1 else ""), "",
             _plan_line(p), ""]
    for name, c in report["claims"].items():
        pub = c["published"]
        lines += [f"## {name}", "", f"Claim: {pub['claim']}. Published: {pub['figure']} ({pub['source']}).", ""]
        if "arms" in c:
            lines += ["| arm | val loss, equal tokens | val bpb | val loss, equal FLOPs (tokens) | "
                      f"train loss @ {c['equal_seconds']:.0f} s | wall s | "
                      "train FLOPs/token | load max/mean | dead experts | KV bytes/token |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for a, e in c["arms"].items():
                lines.append(f"| {a} | {_fmt(e.get('val_loss'))} | {_fmt(e.get('val_bpb'))} | "
                             f"{_fmt(e.get('val_loss_at_equal_flops'))} ({e['equal_flops_tokens']:,}"
                             f"{'' if e['equal_flops_run'] == 'separate run' else ', same run'}) | "
                             f"{_fmt(e.get('train_loss_at_equal_seconds'))}"
                             f" | {_fmt(e.get('wall_s'))} | {e['train_flops_per_token']:.3e} | "
                             f"{_fmt(e.get('load_max_over_mean'))} | {_fmt(e.get('dead_experts'))} | "
                             f"{e.get('kv_bytes_per_token_bf16', '')} |")
            lines.append("")
            for a, e in c["arms"].items():
                if "evaluated_on" in e:
                    lines.append(f"- {a}: validation figures on {e['evaluated_on']}")
                if "decode_tokens_per_s" in e and name in SERVED:
                    lines.append(f"- {a}: {e['decode_tokens_per_s']:.1f} decode tokens/s after a {e['context']}-token "
                                 "context (serving engine, greedy, one stream, seed 0)"
                                 + (f"; MTP drafting {e['speculative_tokens_per_s']:.1f} tokens/s "
                                    f"(x{e['speculative_speedup']:.2f}), acceptance {e['acceptance_rate']:.0%}"
                                    if "speculative_speedup" in e else ""))
            lines.append("")
        if c.get("plot"):
            lines += [f"![{name}: training loss against FLOPs and against seconds]({c['plot']})", ""]
        for v in c["verdicts"]:
            lines.append(f"- {v['arm']} vs {v['against']}, {v['figure']}: **{v['verdict']}** ({v['why']})")
        if not c["verdicts"]:
            lines.append(f"- **{c['verdict']}**: {c['why']}")
        lines.append("")
    return "\n".join(lines)


def _plan_line(p: dict[str, Any]) -> str:
    rates = p.get("rates") or {}
    how = (("Probed training rates (tokens/s): " + ", ".join(f"{a} {r:,.0f}" for a, r in rates.items())
            + f"; {p.get('overhead_s', 0):.0f} s of start-up and evaluation per run.") if rates
           else "No probe: every arm was planned at an assumed rate.")
    twins = p.get("twin_tokens") or {}
    if twins:
        how += " Equal-FLOPs runs: " + ", ".join(f"{a.removesuffix(TWIN)} {t:,} tokens" for a, t in twins.items()) + "."
    return how
