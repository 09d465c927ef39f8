"""`evip export RUN_DIR OUT`: a run's latest weights in the released Mono-InternVL-2B HF layout."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's weights in the Mono-InternVL-2B HF layout",
        description="Write OUT/model*.safetensors (released key names, packed wqkv), OUT/config.json "
                    "and the run's tokenizer from the newest weights of RUN_DIR (the stage in progress's "
                    "latest checkpoint, consolidated, else the last finished stage's; or --stage).")
    p.add_argument("run_dir", help="a run directory of `evip run`")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--stage", default=None, help="a stage's name (default: the newest weights of the run), or 'base'")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="tensor dtype of the export (default bf16, the release's; fp32 is exact)")
    p.set_defaults(func=run)


def export(run_dir, out, stage=None, dtype: str = "bf16") -> Path:
    """Export (see the command's help); returns OUT."""
    import torch

    from evip.inference import InferenceError, latest_weights, run_tokenizer
    from evip.model.weights import save_mono2b

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InferenceError(f"{out} exists and is not an empty directory: export into a new one")
    weights = latest_weights(run_dir, stage)
    print(f"evip export: weights of {weights.describe()}", file=sys.stderr)
    tok = run_tokenizer(run_dir)
    model = weights.build().to(getattr(torch, DTYPES[dtype]))
    out.mkdir(parents=True, exist_ok=True)
    save_mono2b(model, out, tokenizer=tok)
    return out


def run(args: argparse.Namespace) -> int:
    from evip.inference import InferenceError
    try:
        out = export(args.run_dir, args.out, args.stage, args.dtype)
    except InferenceError as e:
        print(f"evip export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.run_dir} to {out}")
    return 0
