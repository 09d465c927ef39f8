"""`evip ablate FILE --run-dir DIR [key=value ...]`: run a table of pipeline variants and compare them.

Every variant (FILE's `variants`, each a list of pipeline overrides) runs as `evip run` into
DIR/<variant>/ and is measured the same way; DIR/ablations.md, ablations.json and ablations.png
hold the comparison, and the last line printed is the JSON object with every variant's figures.
Rerunning continues: measured variants are not run again. Overrides on the command line apply to
every variant (e.g. base.source=...).
"""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("ablate", help="run the variants of an ablation file and compare them (table, plots, JSON)",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("file", help="ablation YAML (e.g. demo/ablations.yaml)")
    p.add_argument("--run-dir", required=True, nargs="+", metavar="DIR [KEY=VALUE ...]",
                   help="directory of the variants' runs and the comparison; an existing one is continued")
    p.add_argument("overrides", nargs="*", help="pipeline overrides for every variant, e.g. base.source=...")
    p.set_defaults(func=main)


def main(args) -> int:
    from evip.ablations import load_ablation, run_ablations

    run_dir, overrides = args.run_dir[0], [*args.overrides, *args.run_dir[1:]]
    la = load_ablation(args.file, overrides)     # every variant's config checked before any run
    summary = run_ablations(la, run_dir, log=lambda s: print(s, flush=True))
    print((Path(run_dir) / "ablations.md").read_text())
    print(json.dumps(summary, separators=(",", ":")))
    return 0
