"""The `evip` command. Each sub-command lives in its own module under evip/commands/ and
defines `register(subparsers)`; this file only discovers and dispatches them."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from evip import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evip",
        description="Endogenous Visual Pre-training (Mono-InternVL): plan, run and inspect EViP stages.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"evip.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from evip.config import ConfigError
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"evip {args.command}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
