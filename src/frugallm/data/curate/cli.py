"""``frugallm curate [INPUT ...] --out DIR``: see ``frugallm.data.curate.pipeline``."""

from __future__ import annotations

import argparse
import json

from frugallm.data.curate.recipe import DEFAULT_RECIPE


def run_curate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from frugallm.data.curate.pipeline import curate
    from frugallm.data.curate.recipe import load_recipe
    from frugallm.data.curate.report import render

    if args.print_recipe:
        print(DEFAULT_RECIPE.read_text(encoding="utf-8"), end="")
        return 0
    console = Console(stderr=args.json)
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the tables into 80 columns
        console = Console(stderr=args.json, width=140)
    report = curate(args.inputs or None, args.out, recipe=load_recipe(args.recipe), workers=args.workers,
                    executor=args.executor, eval_sets=args.eval_set or (), overwrite=args.overwrite,
                    progress=lambda name, message: console.print(message, style="dim"))
    if report.get("still_running"):
        console.print(f"Slurm jobs {', '.join(report['still_running'])} of this curation are still queued or "
                      f"running; run the same command again when they have finished")
        return 0
    if report.get("submitted"):
        console.print(f"submitted Slurm jobs {', '.join(report['job_ids'])} for the passes "
                      f"{', '.join(report['passes'])}; when they have finished, run the same command again to "
                      f"publish the corpus in {report['out']} and write its report")
        return 0
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
        return 0
    for part in render(report):
        console.print(part)
    root = f"{report['output']['dir']}/.curate"
    console.print(f"report: {root}/report.json, {root}/report.txt, {root}/funnel.png")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curate", help="deduplicate, filter and decontaminate a corpus (datatrove)",
        description="Normalise, quality-filter (prose and code), exact- and near-deduplicate and decontaminate "
                    "documents into sharded .jsonl.gz/.parquet that `frugallm train --data DIR` reads. "
                    "With no INPUT, curates the embedded corpus (the standard library's .py files). "
                    "Rerunning an interrupted command resumes it.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text files, .jsonl(.gz), .parquet, directories or globs (default: the embedded corpus)")
    p.add_argument("--out", default="runs/curated", help="output folder (default runs/curated)")
    p.add_argument("--recipe", default=None,
                   help="a TOML recipe (fields not given keep their defaults; see --print-recipe), or a named one: "
                        "default, web (the web-crawl filters Gopher, C4, FineWeb)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running tasks at once (default: the number of CPU cores)")
    p.add_argument("--executor", choices=("local", "slurm", "ray"), default="local",
                   help="datatrove executor: local processes (default), Slurm jobs, or a Ray cluster")
    p.add_argument("--eval-set", action="append", metavar="PATH",
                   help="an evaluation set (file or folder, read like any input) to decontaminate against; "
                        "may be repeated")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a curation of other inputs or another recipe in --out instead of refusing")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.add_argument("--print-recipe", action="store_true", help="print the default recipe (every field) and exit")
    p.set_defaults(func=run_curate)
