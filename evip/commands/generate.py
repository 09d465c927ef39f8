"""`evip generate --run-dir DIR --image PATH --prompt TEXT`: answer from a run's latest weights."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="answer a prompt (with images) from a run's latest weights",
        description="Load the newest weights of RUN_DIR (the stage in progress's latest checkpoint, "
                    "consolidated, else the last finished stage's; or --stage), "
                    "build the prompt with that stage's chat template and image tiling, and print the "
                    "answer (greedy unless --temperature > 0).")
    p.add_argument("--run-dir", required=True, help="a run directory of `evip run`")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file (repeat for several, in prompt order; '<image>' in the prompt "
                        "places them, else they come first)")
    p.add_argument("--prompt", required=True, help="the user turn")
    p.add_argument("--stage", default=None,
                   help="a stage's name (default: the newest weights of the run), or 'base'")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=run)


def answer(args: argparse.Namespace) -> tuple[str, list[int], str]:
    """(decoded answer, new token ids, the stage whose weights answered)."""
    import torch

    from evip.inference import InferenceError, PromptBuilder, latest_weights, read_images, run_tokenizer

    if args.max_new_tokens < 1:
        raise InferenceError(f"--max-new-tokens={args.max_new_tokens}: must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise InferenceError(f"--temperature={args.temperature} --top-p={args.top_p}: need temperature >= 0 "
                             "and 0 < top_p <= 1")
    images = read_images(args.image)
    weights = latest_weights(args.run_dir, args.stage)
    print(f"evip generate: weights of {weights.describe()}", file=sys.stderr)
    tok = run_tokenizer(args.run_dir)
    prompt = PromptBuilder(weights, tok).build(args.prompt, images, args.image)
    limit = weights.model_cfg.max_position_embeddings
    if prompt.input_ids.shape[1] + args.max_new_tokens > limit:
        raise InferenceError(f"prompt ({prompt.input_ids.shape[1]} tokens, images included) + --max-new-tokens="
                             f"{args.max_new_tokens} exceeds the model's max_position_embeddings={limit}: "
                             "use fewer tokens or images")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = weights.build().to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    pixels = prompt.pixel_values.to(device) if prompt.pixel_values is not None else None
    new = model.generate(prompt.input_ids.to(device), pixels, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, generator=gen,
                         eos_token_id=prompt.stop_id)
    ids = new[0].tolist()
    return tok.decode(ids, skip_special_tokens=True), ids, weights.stage


def run(args: argparse.Namespace) -> int:
    from evip.inference import InferenceError
    try:
        text, _, _ = answer(args)
    except InferenceError as e:
        print(f"evip generate: error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0
