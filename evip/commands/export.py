"""`evip export RUN_DIR OUT`: a run's latest weights as a Mono-InternVL (InternLM2-VE) checkpoint that
the released code (trust_remote_code), vLLM and LMDeploy load: released key names, config.json with
the tiling / template / rope / token ids the run trained with, tokenizer files with the image
tokens and chat template, generation_config.json (evip/model/mono2b_layout.py, serving.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's weights in the Mono-InternVL-2B HF layout",
        description="Write OUT/model*.safetensors (released key names, packed wqkv, a tied head copied), "
                    "OUT/config.json (InternVLChatModel + InternLM2-VE, the stage's tiling), the run's "
                    "tokenizer with the training chat template and OUT/generation_config.json from the "
                    "newest weights of RUN_DIR (the stage in progress's latest checkpoint, consolidated, "
                    "else the last finished stage's; or --stage). Refuses a model InternLM2-VE cannot hold "
                    "exactly (q/k/v biases, visual attention experts, no visual FFN).")
    p.add_argument("run_dir", help="a run directory of `evip run`")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--stage", default=None, help="a stage's name (default: the newest weights of the run), or 'base'")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="tensor dtype of the export (default bf16, the release's; fp32 is exact)")
    p.add_argument("--remote-code", default=None, metavar="DIR",
                   help="a local copy of a released Mono-InternVL checkpoint (e.g. OpenGVLab/Mono-InternVL-2B): "
                        "its *.py modelling files are copied next to the weights, so that "
                        "`from_pretrained(OUT, trust_remote_code=True)`, vLLM and LMDeploy find them")
    p.set_defaults(func=run)


def export(run_dir, out, stage=None, dtype: str = "bf16", remote_code=None) -> Path:
    """Export (see the command's help); returns OUT."""
    import torch

    from evip.inference import InferenceError, latest_weights, run_tokenizer, stage_sample_config
    from evip.model.mono2b_layout import NotExportableError, check_exportable
    from evip.model.serving import ServingConfig, copy_remote_code, remote_code_files
    from evip.model.weights import save_mono2b

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InferenceError(f"{out} exists and is not an empty directory: export into a new one")
    try:
        code = remote_code_files(remote_code) if remote_code is not None else []
    except FileNotFoundError as e:
        raise InferenceError(str(e)) from None
    weights = latest_weights(run_dir, stage)
    try:
        check_exportable(weights.model_cfg)      # before any work: a refusal costs nothing
    except NotExportableError as e:
        raise InferenceError(f"{run_dir} cannot be exported as Mono-InternVL: {e}") from None
    print(f"evip export: weights of {weights.describe()}", file=sys.stderr)
    tok = run_tokenizer(run_dir)
    sample_cfg = stage_sample_config(weights)
    serving = ServingConfig.from_sample(sample_cfg) if sample_cfg is not None else ServingConfig()
    model = weights.build().to(getattr(torch, DTYPES[dtype]))
    out.mkdir(parents=True, exist_ok=True)
    save_mono2b(model, out, tokenizer=tok, serving=serving)
    copy_remote_code(code, out)
    return out


def run(args: argparse.Namespace) -> int:
    from evip.inference import InferenceError
    try:
        out = export(args.run_dir, args.out, args.stage, args.dtype, args.remote_code)
    except InferenceError as e:
        print(f"evip export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.run_dir} to {out}")
    return 0
