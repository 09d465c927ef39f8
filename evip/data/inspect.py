"""`evip data inspect RECIPE`: what the loader really produces for a recipe.

Reads `batches` packed micro-batches through the training loader (evip/data/loader.py,
`build_loader`, rank 0 of 1) and reports: samples per source and the realised mixture next to
the recipe weights, bad samples per source and reason, packing efficiency, histograms of tokens
and tiles per sample; and writes a PNG contact sheet of the first samples: their tiles laid out
on their grid (grid lines drawn, thumbnail beside), kind, token and tile counts, and their text
(captions: what is trained on; chats: the dialogue). Everything is recovered from the batches
themselves (seq_ids, image blocks, pixel_values in order): the sheet shows what the model sees.
"""
from __future__ import annotations

import math
import textwrap
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from evip.batch import IGNORE_INDEX, KINDS
from evip.data.images import IMAGENET_MEAN, IMAGENET_STD
from evip.model.vision import normalise_pixels
from evip.model.tokens import IMG_CONTEXT, IMG_END, IMG_START


@dataclass
class SampleView:
    """One sample cut back out of a packed batch."""
    kind: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    images: list[torch.Tensor]        # per image: [n_tiles, 3, S, S] (normalised)


def split_batch(batch: dict, ids: dict[str, int], tokens_per_tile: int) -> list[SampleView]:
    """Cut a packed batch back into its samples, each with its images' tiles (in order)."""
    out, tile = [], 0
    pixels = normalise_pixels(batch["pixel_values"])     # uint8 from the workers -> what the model sees
    for b in range(batch["input_ids"].shape[0]):
        seq = batch["seq_ids"][b]
        for sid in range(int(seq.max()) + 1 if (seq >= 0).any() else 0):
            idx = (seq == sid).nonzero().flatten()
            tok = batch["input_ids"][b, idx]
            images = []
            starts = (tok == ids[IMG_START]).nonzero().flatten().tolist()
            ends = (tok == ids[IMG_END]).nonzero().flatten().tolist()
            for s, e in zip(starts, ends):
                n = int((tok[s:e] == ids[IMG_CONTEXT]).sum()) // tokens_per_tile
                images.append(pixels[tile:tile + n])
                tile += n
            out.append(SampleView(KINDS[int(batch["kind_ids"][b, idx[0]])], tok, batch["labels"][b, idx], images))
    return out


def to_pil(tile: torch.Tensor) -> Image.Image:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = ((tile * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(x, "RGB")


def infer_grid(tiles: torch.Tensor) -> tuple[int, int, bool]:
    """(columns, rows, has_thumbnail) of one image's tiles. With a thumbnail (n > 1 tiles) the
    grid is the factorisation of n - 1 whose mosaic, shrunk to one tile, best matches it."""
    n = tiles.shape[0]
    if n <= 1:
        return 1, 1, False
    tiles = normalise_pixels(tiles)                       # uint8 or normalised float -> float
    g, thumb = n - 1, tiles[-1:]
    best, best_err = (g, 1), float("inf")
    for cols in range(1, g + 1):
        if g % cols:
            continue
        rows = g // cols
        mosaic = tiles[:g].view(rows, cols, *tiles.shape[1:]).permute(2, 0, 3, 1, 4)
        mosaic = mosaic.reshape(1, 3, rows * tiles.shape[-2], cols * tiles.shape[-1])
        err = (F.interpolate(mosaic, size=tiles.shape[-2:], mode="area") - thumb).pow(2).mean().item()
        if err < best_err:
            best, best_err = (cols, rows), err
    return best[0], best[1], True


def render_image(tiles: torch.Tensor, box: int) -> Image.Image:
    """The tiles on their grid with red grid lines, the thumbnail (if any) beside, fit in box x box."""
    cols, rows, thumb = infer_grid(tiles)
    S = tiles.shape[-1]
    canvas = Image.new("RGB", (cols * S + (S // 2 + 4 if thumb else 0), rows * S), "white")
    for k in range(cols * rows):
        canvas.paste(to_pil(tiles[k]), ((k % cols) * S, (k // cols) * S))
    draw = ImageDraw.Draw(canvas)
    for c in range(1, cols):
        draw.line([(c * S, 0), (c * S, rows * S)], fill="red", width=max(1, S // 64))
    for r in range(1, rows):
        draw.line([(0, r * S), (cols * S, r * S)], fill="red", width=max(1, S // 64))
    if thumb:
        canvas.paste(to_pil(tiles[-1]).resize((S // 2, S // 2)), (cols * S + 4, 0))
    scale = box / max(canvas.size)
    return canvas.resize((max(1, int(canvas.width * scale)), max(1, int(canvas.height * scale))))


def contact_sheet(samples: list[SampleView], tokenizer, path: str, columns: int = 4, cell: int = 320) -> None:
    """Write a PNG grid: one cell per sample (its images, a header line, the trained text)."""
    text_h = 150
    rows = max(1, math.ceil(len(samples) / columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x0, y0 = (i % columns) * cell, (i // columns) * (cell + text_h)
        y, tiles_desc = y0 + 4, []
        for img in s.images[:2]:
            pic = render_image(img, (cell - 8) // min(2, len(s.images)) if len(s.images) > 1 else cell - 8)
            sheet.paste(pic, (x0 + 4, y))
            y += pic.height + 2
        for img in s.images:
            c, r, t = infer_grid(img)
            tiles_desc.append(f"{c}x{r}{'+th' if t else ''}")
        # captions and documents: the text trained on; chats: the whole dialogue (roles included)
        shown = s.input_ids.tolist() if s.kind == "chat" else [int(t) for t in s.labels if t != IGNORE_INDEX]
        text = " ".join(tokenizer.decode(shown, skip_special_tokens=True).split())
        header = f"{s.kind} | {len(s.input_ids)} tok | tiles {' '.join(tiles_desc) or '-'}"
        lines = [header] + textwrap.wrap(text, width=cell // 7)[:8]
        draw.multiline_text((x0 + 4, y0 + cell + 2), "\n".join(lines), fill="black", spacing=2)
        draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell + text_h - 1], outline="grey")
    sheet.save(path)


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram lines: 'lo-hi | #### n'."""
    if not values:
        return ["(no samples)"]
    lo, hi = min(values), max(values)
    step = max(1, math.ceil((hi - lo + 1) / bins))
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    return [f"{lo + k * step:>7}-{lo + (k + 1) * step - 1:<7}| {'#' * max(1, round(width * counts[k] / top)) if counts[k] else ''} {counts[k]}"
            for k in range((hi - lo) // step + 1)]


def inspect_recipe(data_cfg, tokenizer, model_cfg, batches: int, sheet: str | None, sheet_samples: int = 16,
                   log=print) -> dict:
    """Read `batches` micro-batches of `data_cfg` (a DataConfig), print the report, write the
    sheet; return the figures as a dict (for tests and scripts)."""
    from evip.data.loader import build_loader
    from evip.data.recipe import load_recipe

    recipe = load_recipe(data_cfg.recipe, data_cfg.recipe_overrides)
    loader = build_loader(data_cfg, tokenizer, model_cfg, rank=0, world_size=1)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)}
    views: list[SampleView] = []
    lengths, tiles, n = [], [], 0
    for batch in loader:
        for v in split_batch(batch, ids, model_cfg.tokens_per_tile):
            lengths.append(len(v.input_ids))
            tiles.append(sum(int(img.shape[0]) for img in v.images))
            if len(views) < sheet_samples:
                views.append(v)
        n += 1
        if n >= batches:
            break
    stats = loader.stats()
    total = sum(stats["samples"].values()) or 1
    wsum = sum(s.weight for s in recipe.sources)
    log(f"recipe {recipe.name or data_cfg.recipe}: {n} micro-batches of {data_cfg.rows} x "
        f"{data_cfg.token_budget} tokens, {len(lengths)} samples, packing efficiency "
        f"{stats['packing_efficiency']:.3f}")
    log(f"{'source':<24}{'samples':>9}{'realised':>10}{'weight':>9}   bad (reason: n)")
    mixture = {}
    for s in recipe.sources:
        got = stats["samples"].get(s.name, 0)
        mixture[s.name] = got / total
        bad = ", ".join(f"{r}: {c}" for r, c in sorted(stats["bad"].get(s.name, {}).items())) or "-"
        log(f"{s.name:<24}{got:>9}{got / total:>10.3f}{s.weight / wsum:>9.3f}   {bad}")
    log("tokens per sample:")
    for line in histogram(lengths):
        log("  " + line)
    log("tiles per sample:")
    for line in histogram(tiles):
        log("  " + line)
    if sheet:
        contact_sheet(views, tokenizer, sheet)
        log(f"contact sheet of {len(views)} samples: {sheet}")
    return {"batches": n, "samples": stats["samples"], "bad": stats["bad"], "mixture": mixture,
            "packing_efficiency": stats["packing_efficiency"], "tokens": lengths, "tiles": tiles,
            "sheet": sheet}
