"""`evip demo-data OUT_DIR`: write the demo's synthetic scene data (shards, chats, held-out questions)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from evip.demo.make_data import DemoDataConfig, build_demo_data


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo-data", help="write the demo's rendered-scene data for all four EViP stages",
        description="Render deterministic scenes and write S1.1/S1.2/S1.3 webdataset shards, "
                    "S1.3/S2 LLaVA jsonl chats and held-out multiple-choice questions.")
    p.add_argument("out_dir", help="output directory (created)")
    defaults = DemoDataConfig()
    for f in fields(DemoDataConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=getattr(defaults, f.name),
                       dest=f.name, help=f"(default {getattr(defaults, f.name)})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoDataConfig(**{f.name: getattr(args, f.name) for f in fields(DemoDataConfig)})
    manifest = build_demo_data(args.out_dir, cfg)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    n_shards = sum(len(v) for v in manifest["shards"].values())
    print(f"demo data in {args.out_dir}: {counts}; {n_shards} shards; {manifest['seconds']} s")
    return 0
