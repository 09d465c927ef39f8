"""`evip data build` (folder / jsonl / HF dataset -> webdataset shards + manifest) and
`evip data inspect RECIPE` (counts, realised mixture, histograms, PNG contact sheet)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="build shards from raw data; inspect what a recipe yields")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    b = sub.add_parser("build", help="convert a folder of images+captions, a jsonl or an HF dataset "
                                     "into webdataset tar shards (img2dataset layout) with a manifest.json")
    b.add_argument("input", help="folder (x.jpg + x.txt), InternVL/LLaVA .jsonl, or HF dataset "
                                 "(save_to_disk dir, parquet/arrow file or dir)")
    b.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    b.add_argument("--format", default="auto", choices=["auto", "folder", "jsonl", "hf"])
    b.add_argument("--root", default="", help="jsonl: directory image paths are relative to "
                                               "(default: the jsonl's directory)")
    b.add_argument("--image-column", default="image")
    b.add_argument("--text-column", default="text", help="hf: caption column")
    b.add_argument("--conversations-column", default="", help="hf: conversations column (chat data)")
    b.add_argument("--caption", default="whole", choices=["whole", "first_line", "first_paragraph"],
                   help="folder: which part of x.txt is the caption: the whole file (default), its first "
                        "non-empty line, or its first paragraph (lines up to the first blank line, joined)")
    b.add_argument("--max-caption-chars", type=int, default=2000,
                   help="warn, with counts, about captions longer than this (the S1 recipes' "
                        "filters.max_caption_chars drop them); 0: off")
    b.add_argument("--heldout", type=float, default=0,
                   help="held-out split: N samples (>= 1) or a fraction in (0, 1), spread evenly over the "
                        "input, written as heldout-*.tar with its own recipe OUT/heldout.yaml")
    b.add_argument("--samples-per-shard", type=int, default=10_000)
    b.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    b.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=run_build)

    i = sub.add_parser("inspect", help="read a recipe through the training loader; print counts, "
                                       "mixture, histograms; write a contact sheet")
    i.add_argument("recipe", help="data_recipes/*.yaml")
    i.add_argument("overrides", nargs="*", help="DataConfig dotlist, e.g. token_budget=2048 "
                                                "sample.image.max_tiles=12 num_workers=0")
    i.add_argument("--batches", type=int, default=16, help="micro-batches to read")
    i.add_argument("--sheet", default="contact_sheet.png", help="PNG path ('' to skip)")
    i.add_argument("--sheet-samples", type=int, default=16)
    i.add_argument("--tokenizer", default="", help="HF tokenizer dir or .gguf (default: the real SmolLM2 GGUF)")
    i.add_argument("--tile-size", type=int, default=448, help="model image_size (pixels per tile side)")
    i.add_argument("--patch-size", type=int, default=14)
    i.set_defaults(func=run_inspect)


def run_build(args: argparse.Namespace) -> int:
    import sys

    from evip.data.build import REASONS, BuildConfig, BuildError, build_shards

    cfg = BuildConfig(input=args.input, out=args.out, format=args.format, root=args.root,
                      image_column=args.image_column, text_column=args.text_column,
                      conversations_column=args.conversations_column, caption=args.caption,
                      max_caption_chars=args.max_caption_chars, heldout=args.heldout,
                      samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                      prefix=args.prefix, progress=not args.no_progress)
    try:
        result = build_shards(cfg)
    except (BuildError, OSError) as e:
        print(f"evip data build: error: {getattr(e, 'strerror', None) and f'{e.strerror}: {e.filename}' or e}",
              file=sys.stderr)
        return 2
    out = args.out
    print(f"{result.inputs} inputs: {result.count} {result.kind} samples in {len(result.shards)} shards "
          f"({sum(s.bytes for s in result.shards) / 1e6:.1f} MB)"
          + (f", {result.heldout_count} held out in {len(result.heldout)} shards" if result.heldout else "")
          + f", {sum(result.skipped.values())} skipped; to {out}")
    for reason, n in sorted(result.skipped.items(), key=lambda kv: -kv[1]):
        print(f"  skipped {n} {reason}: {REASONS.get(reason, reason)}; e.g. {', '.join(result.examples[reason][:3])}")
    print(f"  every input and what became of it: {out}/report.jsonl; manifest: {out}/manifest.json")
    if result.long_captions:
        print(f"warning: {result.long_captions} of {result.count + result.heldout_count} captions are longer than "
              f"{args.max_caption_chars} characters (longest {result.longest_caption}); a recipe filter "
              f"max_caption_chars={args.max_caption_chars} (as in data_recipes/s1_*.yaml) drops them as "
              f"caption_length: pass --caption first_line or first_paragraph, or raise the filter", file=sys.stderr)
    if not result.count:
        print(f"evip data build: wrote no samples: {result.why_empty()}", file=sys.stderr)
        return 1
    for split, path in result.recipes.items():
        key = "data.recipe" if split == "train" else "eval.heldout_data.recipe"
        print(f"  {split} recipe: {path}  ({key}={path})")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from evip.assets import smollm2_gguf
    from evip.config import load_config
    from evip.data.inspect import inspect_recipe
    from evip.data.loader import DataConfig
    from evip.model.config import ModelConfig
    from evip.model.tokens import IMG_CONTEXT, load_tokenizer

    data_cfg = load_config(DataConfig, None, [f"recipe={args.recipe}", *args.overrides])
    tok = load_tokenizer(args.tokenizer or smollm2_gguf())
    model_cfg = ModelConfig(image_size=args.tile_size, patch_size=args.patch_size, vocab_size=len(tok),
                            img_context_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT),
                            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    inspect_recipe(data_cfg, tok, model_cfg, args.batches, args.sheet or None, args.sheet_samples)
    return 0
