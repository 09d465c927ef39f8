"""`evip report RUN_DIR`: PNG plots (loss per stage, forgetting, throughput, data wait) and summary.md."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="plot a run's metrics and write a markdown summary per stage",
        description="Read RUN_DIR/metrics.jsonl and write loss.png, forgetting.png, throughput.png, "
                    "data_wait.png and summary.md (default into RUN_DIR/report).")
    p.add_argument("run_dir", help="a run directory of `evip run`")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    p.add_argument("--heldout", default=None, metavar="QUESTIONS_JSON",
                   help="first score the last finished stage on these held-out multiple-choice "
                        "questions (from `evip demo-data`: DATA/heldout/questions.json) into "
                        "RUN_DIR/accuracy.json")
    p.add_argument("--heldout-limit", type=int, default=None, help="use only the first N questions")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from evip.report import write_report
    if args.heldout:
        from evip.demo.accuracy import run_accuracy
        r = run_accuracy(args.run_dir, args.heldout, args.heldout_limit)
        print(f"held-out accuracy {r.correct}/{r.n} = {100 * r.accuracy:.1f}% "
              f"(chance {100 * r.chance:.1f}%, majority {100 * r.majority:.1f}%)")
    files = write_report(args.run_dir, args.out)
    print(files["summary"].read_text())
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0
