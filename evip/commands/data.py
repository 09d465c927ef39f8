"""`evip data build` (folder / jsonl / HF dataset -> webdataset shards + manifest) and
`evip data inspect RECIPE|SHARDS|STAGE` (counts, realised mixture, histograms, PNG contact sheet)."""
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
    b.add_argument("--min-caption-chars", type=int, default=5,
                   help="warn, with counts, about captions shorter than this (the S1 recipes' "
                        "filters.min_caption_chars drop them); 0: off")
    b.add_argument("--heldout", type=float, default=0,
                   help="held-out split: N samples (>= 1) or a fraction in (0, 1), spread evenly over the "
                        "input, written as heldout-*.tar with its own recipe OUT/heldout.yaml")
    b.add_argument("--samples-per-shard", type=int, default=10_000)
    b.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    b.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=run_build)

    i = sub.add_parser("inspect", help="read a recipe, shards, or a stage's data through the training loader; "
                                       "print counts, mixture, histograms; write a contact sheet")
    i.add_argument("target", help="a recipe YAML; a shard folder, .tar or glob ('out/shard-*.tar'); or a stage "
                                  "or pipeline YAML (a pipeline needs --stage NAME): then that stage's recipe, "
                                  "token budget, tiles, sizes and filters are used")
    i.add_argument("overrides", nargs="*", help="recipe or shards: DataConfig keys, e.g. token_budget=2048 "
                                                "sample.image.max_tiles=12 num_workers=0; stage: stage keys "
                                                "(data.token_budget=2048); pipeline: as for `evip run`")
    i.add_argument("--stage", default="", help="the stage of a pipeline file to inspect")
    i.add_argument("--kind", default="", choices=["", "caption", "chat", "text"],
                   help="shards: their kind (default: the folder's manifest.json, else caption)")
    i.add_argument("--batches", type=int, default=16, help="micro-batches to read")
    i.add_argument("--sheet", default="contact_sheet.png", help="PNG path ('' to skip)")
    i.add_argument("--sheet-samples", type=int, default=16)
    i.add_argument("--tokenizer", default="", help="HF tokenizer dir or .gguf (default: the real SmolLM2 GGUF)")
    i.add_argument("--tile-size", type=int, default=0,
                   help="model image_size, pixels per tile side (default: the pipeline's, else 448)")
    i.add_argument("--patch-size", type=int, default=0, help="default: the pipeline's, else 14")
    i.set_defaults(func=run_inspect)


def run_build(args: argparse.Namespace) -> int:
    import sys

    from evip.data.build import REASONS, BuildConfig, BuildError, build_shards

    cfg = BuildConfig(input=args.input, out=args.out, format=args.format, root=args.root,
                      image_column=args.image_column, text_column=args.text_column,
                      conversations_column=args.conversations_column, caption=args.caption,
                      max_caption_chars=args.max_caption_chars, min_caption_chars=args.min_caption_chars,
                      heldout=args.heldout,
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
    if result.short_captions:
        print(f"warning: {result.short_captions} of {result.count + result.heldout_count} captions are shorter than "
              f"{args.min_caption_chars} characters; a recipe filter min_caption_chars={args.min_caption_chars} "
              f"(as in data_recipes/s1_1_concept.yaml) drops them as caption_length: check the caption files "
              f"(--caption first_line takes the first non-empty line), or lower the filter", file=sys.stderr)
    if not result.count:
        print(f"evip data build: wrote no samples: {result.why_empty()}", file=sys.stderr)
        return 1
    for split, path in result.recipes.items():
        key = "data.recipe" if split == "train" else "eval.heldout_data.recipe"
        print(f"  {split} recipe: {path}  ({key}={path})")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import tempfile

    from evip.assets import smollm2
    from evip.data.inspect import inspect_recipe
    from evip.data.inspect_target import inspect_target
    from evip.model.config import ModelConfig
    from evip.model.tokens import IMG_CONTEXT, load_tokenizer

    with tempfile.TemporaryDirectory(prefix="evip-inspect-") as work:
        target = inspect_target(args.target, args.stage, args.overrides, args.kind, work)
        tok = load_tokenizer(args.tokenizer or smollm2())
        model_cfg = ModelConfig(image_size=args.tile_size or target.tile_size or 448,
                                patch_size=args.patch_size or target.patch_size or 14, vocab_size=len(tok),
                                img_context_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT),
                                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        im = target.data.sample.image
        print(f"inspect {target.what}: tiles of {model_cfg.image_size} px, {im.min_tiles}-{im.max_tiles} per "
              f"image, token budget {target.data.token_budget}")
        inspect_recipe(target.data, tok, model_cfg, args.batches, args.sheet or None, args.sheet_samples)
    return 0
