"""The ``frugallm`` command. Each area registers its own subcommands (``register(subparsers)``) so this file
stays a thin dispatcher; user errors (``frugallm.errors.FrugalError``) print one line and exit with code 2."""

from __future__ import annotations

import argparse
import importlib
import sys

# area modules, each with register(subparsers) adding its subcommands and setting func=handler(args) -> int
AREAS = [
    "frugallm.info",
    "frugallm.data.cli",
    "frugallm.data.curate.cli",
    "frugallm.train.cli",
    "frugallm.tune.cli",
    "frugallm.rl.cli",
    "frugallm.cost.cli",
    "frugallm.serve.cli",
    "frugallm.lab.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frugallm",
        description="Train, fine-tune and serve DeepSeek-V3-style models, and know what each run cost.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AREAS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # area not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from frugallm.errors import FrugalError

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"] if "train" in parser._subparsers._group_actions[0].choices else ["--help"]  # type: ignore[union-attr]
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FrugalError as e:
        print(f"frugallm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("frugallm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
