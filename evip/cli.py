"""The `evip` command. Each sub-command lives in its own module under evip/commands/ and
defines `register(subparsers)`; this file only discovers and dispatches them."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from evip import commands

EXAMPLES = """first steps:
  make demo                                          the four stages on CPU from the real SmolLM2-135M
  evip plan stages/pipeline_internlm2.yaml base.source=/models/internlm2-1_8b --world-size 64
  evip run  stages/pipeline_internlm2.yaml --run-dir /shared/runs/mono base.source=/models/internlm2-1_8b
  evip run  ... (the same command again)             continues at the stage and step where it stopped
  evip generate --run-dir RUN --image cat.jpg --prompt "What is this?"
  evip export RUN out/mono-2b                        Mono-InternVL-2B HF layout

exit codes of `evip run`: 0 done, 1 error, 2 config error, 75 preempted (checkpointed; rerun),
76 too many non-finite steps, 77 restarted too often without progress.
on clusters use launch/torchrun.sh or launch/slurm.sbatch (see launch/README.md)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evip",
        description="Endogenous Visual Pre-training (Mono-InternVL): plan, run and inspect EViP stages.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
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
