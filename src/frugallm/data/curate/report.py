"""The curation report: per-task meters merged into ``report.json``, a rich table and a PNG funnel chart."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from frugallm import fsio
from frugallm.data.curate.steps import TOKEN_RULE, write_json

if TYPE_CHECKING:
    from frugallm.data.curate.recipe import Recipe

STAGES = ("normalise", "quality", "exact_dedup", "near_dedup", "decontaminate")
REPORT_FORMAT = 1


def _rank_files(meter_dir: str, stage: str) -> list[Path]:
    folder = Path(meter_dir) / stage
    return sorted(folder.glob("[0-9]*.json")) if folder.is_dir() else []


def load_meters(meter_dir: str, stage: str, examples: int = 3) -> dict[str, Any]:
    """One stage's counts summed over its tasks; examples are taken in task order, ``examples`` a reason."""
    parts = [json.loads(p.read_text(encoding="utf-8")) for p in _rank_files(meter_dir, stage)]
    if stage == "source":
        total: Counter[str] = Counter()
        for part in parts:
            total.update(part)
        return {"files": 0, "documents": 0, "bytes": 0, **total}
    merged: dict[str, Any] = {"in": Counter(), "out": Counter(), "reasons": Counter(), "examples": {},
                              "extra": Counter(), "kinds_out": Counter(), "edits": {}}
    for part in parts:
        for key in ("in", "out", "reasons", "extra", "kinds_out"):
            merged[key].update(part.get(key, {}))
        for name, e in part.get("edits", {}).items():
            into = merged["edits"].setdefault(name, {"docs": 0, "chars_before": 0, "chars_removed": 0,
                                                     "examples": []})
            for key in ("docs", "chars_before", "chars_removed"):
                into[key] += e[key]
            into["examples"] = (into["examples"] + e["examples"])[:examples]
        for reason, quoted in part["examples"].items():
            merged["examples"].setdefault(reason, []).extend(quoted)
    for side in ("in", "out"):
        merged[side] = {k: merged[side].get(k, 0) for k in ("docs", "bytes", "tokens")}
    merged["examples"] = {r: q[:examples] for r, q in merged["examples"].items()}
    merged["reasons"] = dict(sorted(merged["reasons"].items(), key=lambda kv: (-kv[1], kv[0])))
    merged["extra"] = dict(merged["extra"])
    merged["kinds_out"] = dict(merged["kinds_out"])
    return merged


def _settings(name: str, recipe: Recipe) -> dict[str, Any]:
    if name == "near_dedup":
        nd = recipe.near_dedup
        return {"ngram": nd.ngram, "bands": nd.bands, "rows": nd.rows, "threshold": nd.threshold,
                "lsh_50pct_similarity": round(nd.lsh_threshold, 4), "tokenizer": nd.tokenizer}
    if name == "decontaminate":
        return {"ngram": recipe.decontaminate.ngram, "eval_sets": list(recipe.decontaminate.eval_sets)}
    if name == "quality":
        return {"kind": recipe.quality.kind, "code_filters": recipe.quality.code.enabled,
                "text_rules": recipe.quality.text.enabled,
                "prose_filters": [n for n in ("language", "badwords", "gopher_repetition", "gopher_quality",
                                              "c4", "fineweb") if getattr(recipe.quality.prose, n).enabled]}
    return {}


def merge_report(layout: Any, recipe: Recipe, passes: list[Any], plan: dict[str, Any], timings: dict[str, float],
                 shards: list[str], *, resumed: bool, inputs: Any, executor: str, workers: int,
                 wall_seconds: float) -> dict[str, Any]:
    k = recipe.run.examples_per_reason
    source = load_meters(layout.meters, "source")
    ran = {s for p in passes for s in p.stages}
    stages = []
    for name in STAGES:
        entry: dict[str, Any] = {"name": name, "enabled": name in ran}
        if name in ran:
            m = load_meters(layout.meters, name, k)
            entry.update(m)
            entry["removed"] = {key: m["in"][key] - m["out"][key] for key in ("docs", "bytes", "tokens")}
            entry["removed_docs_pct"] = round(100.0 * entry["removed"]["docs"] / max(1, m["in"]["docs"]), 2)
            if name == "near_dedup":
                entry["extra"].update(load_meters(layout.meters, "near_dedup_pairs")["extra"])
            if name == "decontaminate":
                entry["extra"].update(load_meters(layout.meters, "decontaminate_index")["extra"])
        entry["settings"] = _settings(name, recipe)
        stages.append(entry)
    active = [s for s in stages if s["enabled"]]
    last = active[-1]["out"] if active else {"docs": source["documents"], "bytes": source["bytes"], "tokens": None}
    first_in = active[0]["in"] if active else last
    emptied = next((s["name"] for s in active if s["out"]["docs"] == 0), None)
    seconds = sum(timings.values())
    out_dir = Path(layout.out)
    quality = next((s for s in active if s["name"] == "quality"), None)
    kinds: dict[str, dict[str, int]] = {}
    if quality is not None:  # in: what the quality stage saw of each kind; out: what the corpus holds
        for key, n in quality["extra"].items():
            if key.startswith("kind_"):
                kinds[key.removeprefix("kind_")] = {"in": n, "out": active[-1]["kinds_out"].get(
                    key.removeprefix("kind_"), 0)}
    edits = quality["edits"] if quality is not None else {}
    return {
        "format": REPORT_FORMAT,
        "inputs": list(inputs) if inputs else ["(embedded corpus: the standard library's .py files)"],
        "source": source,
        "stages": stages,
        "output": {"dir": str(out_dir), "format": recipe.run.output_format, "shards": shards,
                   "documents": last["docs"], "bytes": last["bytes"], "tokens": last["tokens"],
                   "disk_bytes": sum((out_dir / s).stat().st_size for s in shards)},
        "removed": {"docs": first_in["docs"] - last["docs"], "bytes": first_in["bytes"] - last["bytes"],
                    "tokens": (first_in["tokens"] or 0) - (last["tokens"] or 0)},
        "emptied_by": emptied,
        "kinds": kinds,
        # documents whose text a filter changed (C4's line removal, when a recipe turns it on), per filter
        "edits": {name: {**e, "chars_removed_pct": round(100.0 * e["chars_removed"] / max(1, e["chars_before"]), 2)}
                  for name, e in edits.items()},
        "edited_documents": sum(e["docs"] for e in edits.values()),
        "tokens_counted_as": TOKEN_RULE,
        "timing": {"passes_seconds": {k: round(v, 3) for k, v in timings.items()}, "seconds": round(seconds, 3),
                   "docs_per_second": round(source["documents"] / seconds, 2) if seconds else None,
                   "wall_seconds_this_invocation": round(wall_seconds, 3), "resumed": resumed,
                   "executor": executor, "workers": workers, "tasks": plan["tasks"], "cpu_count": os.cpu_count()},
        "recipe": recipe.to_dict(),
    }


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f}"


def render(report: dict[str, Any]) -> list[Any]:
    """The report as rich renderables: the funnel table, the removed examples, a summary line."""
    from rich.table import Table
    from rich.text import Text

    src = report["source"]
    funnel = Table(title="frugallm curate: documents, bytes and tokens through each stage", title_justify="left")
    for col, justify in (("stage", "left"), ("docs in", "right"), ("docs out", "right"), ("removed", "right"),
                         ("MB out", "right"), ("tokens out", "right"), ("top reasons (count)", "left")):
        funnel.add_column(col, justify=justify)  # type: ignore[arg-type]
    skipped = {k.removeprefix("skipped_"): v for k, v in src.items() if k.startswith("skipped_") and v}
    funnel.add_row("read", f"{src['files']:,} files", _num(src["documents"]), "", _mb(src["bytes"]), "",
                   ", ".join(f"skipped {k}: {v}" for k, v in skipped.items()))
    for s in report["stages"]:
        if not s["enabled"]:
            funnel.add_row(Text(s["name"], style="dim"), "", "", "", "", "", Text("off", style="dim"))
            continue
        reasons = ", ".join(f"{r} ({n:,})" for r, n in list(s["reasons"].items())[:3])
        if s["name"] == "near_dedup" and "candidate_pairs" in s["extra"]:
            e = s["extra"]
            reasons += f"; pairs: {e['candidate_pairs']:,} candidates, {e['verified_pairs']:,} verified"
        funnel.add_row(s["name"], _num(s["in"]["docs"]), _num(s["out"]["docs"]),
                       f"{s['removed']['docs']:,} ({s['removed_docs_pct']:.1f}%)", _mb(s["out"]["bytes"]),
                       _num(s["out"]["tokens"]), reasons)
    examples = Table(title="removed documents, a few per reason", title_justify="left")
    for col in ("stage", "reason", "document", "begins"):
        examples.add_column(col, overflow="fold")
    for s in report["stages"]:
        for reason, quoted in (s.get("examples") or {}).items():
            for ex in quoted:
                first = " ".join(ex["text"].split())[:70]
                examples.add_row(s["name"], reason, ex["id"][-60:], first + (f" [{ex['note']}]" if "note" in ex
                                                                             else ""))
    kinds = Table(title="documents by kind (as the quality stage judged them): in, and in the corpus",
                  title_justify="left")
    for col, justify in (("kind", "left"), ("docs in", "right"), ("docs out", "right"), ("kept", "right")):
        kinds.add_column(col, justify=justify)  # type: ignore[arg-type]
    for kind, n in sorted(report.get("kinds", {}).items()):
        kinds.add_row(kind, f"{n['in']:,}", f"{n['out']:,}", f"{100 * n['out'] / max(1, n['in']):.1f}%")
    edits = Table(title="documents whose text a filter changed (lines removed)", title_justify="left")
    for col in ("filter", "docs edited", "chars removed", "example document", "a removed line"):
        edits.add_column(col, overflow="fold")
    for name, e in report.get("edits", {}).items():
        first = e["examples"][0] if e["examples"] else {"id": "", "removed_lines": []}
        line = " ".join(first["removed_lines"][0].split())[:60] if first["removed_lines"] else ""
        edits.add_row(name, f"{e['docs']:,}", f"{e['chars_removed']:,} ({e['chars_removed_pct']:.1f}%)",
                      first["id"][-50:], line)
    if not report.get("edits"):
        edits.add_row("(none)", "0", "0", "", "no filter changed the text of any document")
    t, out = report["timing"], report["output"]
    summary = Text(
        f"{src['documents']:,} documents in, {out['documents']:,} out "
        f"({report['removed']['docs']:,} removed, {report['removed']['tokens']:,} tokens); "
        f"{t['seconds']:.1f} s on {t['workers']} workers x {t['tasks']} tasks = "
        f"{t['docs_per_second'] or 0:,.1f} docs/s{' (resumed)' if t['resumed'] else ''}; "
        f"{report.get('edited_documents', 0):,} documents edited.\n"
        f"corpus: {out['dir']} ({len(out['shards'])} {out['format']} shards, {out['disk_bytes'] / 1e6:,.1f} MB); "
        f"tokens counted as {report['tokens_counted_as']}")
    return [funnel, kinds, examples, edits, summary]


def write_funnel_png(report: dict[str, Any], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    active = [s for s in report["stages"] if s["enabled"]]
    labels = ["read"] + [s["name"] for s in active]
    docs = [report["source"]["documents"]] + [s["out"]["docs"] for s in active]
    first_tokens = active[0]["in"]["tokens"] if active else 0
    tokens = [first_tokens] + [s["out"]["tokens"] for s in active]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 * len(labels) + 1.6))
    for ax, values, what in ((axes[0], docs, "documents"), (axes[1], tokens, "tokens (regex count)")):
        top = max(values[0], 1)
        bars = ax.barh(range(len(values)), values, color="#4c72b0")
        ax.set_yticks(range(len(values)), labels)
        ax.invert_yaxis()
        ax.set_title(f"{what} after each stage")
        ax.set_xlim(0, top * 1.35)
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:,} ({100 * v / top:.1f}%)",
                    va="center", fontsize=8)
    t = report["timing"]
    fig.suptitle(f"frugallm curate: {report['source']['documents']:,} -> {report['output']['documents']:,} documents,"
                 f" {t['seconds']:.0f} s, {t['docs_per_second'] or 0:,.0f} docs/s", fontsize=10)
    fig.tight_layout()
    with fsio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_report(root: str | os.PathLike, report: dict[str, Any]) -> None:
    from rich.console import Console

    root = Path(root)
    write_json(root / "report.json", report)
    console = Console(record=True, width=140, file=open(os.devnull, "w"))  # noqa: SIM115
    for part in render(report):
        console.print(part)
    fsio.write_text(root / "report.txt", console.export_text())
    console.file.close()
    write_funnel_png(report, root / "funnel.png")
