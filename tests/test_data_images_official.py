"""`image.resize: pil` gives the official InternVL loader's pixels for every input it accepts.

The reference below is written here from the official loader's documented behaviour (the
InternVL README's `load_image` / `dynamic_preprocess` and the training dataset's multi-image
rule), not taken from evip: open the file, `.convert('RGB')`, pick the grid of min..max tiles
whose aspect ratio is nearest the image's (a tie goes to the larger grid when the image covers
more than half its pixels), resize to it with Pillow's bicubic, cut row-major, add the whole
image resized to one tile when there are several; with n images each gets at most
max(1, max_tiles // n) tiles, and no grid fits -> one tile.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from evip.data.images import ImageConfig, ImageProcessor, per_image_max_tiles


def official_grid(w: int, h: int, size: int, lo: int, hi: int) -> tuple[int, int]:
    candidates = sorted({(c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi},
                        key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), None
    for c, r in candidates:
        diff = abs(w / h - c / r)
        if best_diff is None or diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and w * h > 0.5 * size * size * c * r:
            best = (c, r)
    return best


def official_tiles(raw: bytes, size: int, lo: int, hi: int, thumbnail: bool = True) -> torch.Tensor:
    im = Image.open(io.BytesIO(raw)).convert("RGB")
    c, r = official_grid(*im.size, size, lo, hi)
    big = im.resize((c * size, r * size), Image.Resampling.BICUBIC)
    tiles = [big.crop((x * size, y * size, (x + 1) * size, (y + 1) * size)) for y in range(r) for x in range(c)]
    if thumbnail and len(tiles) > 1:
        tiles.append(im.resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy(np.stack([np.asarray(t) for t in tiles])).permute(0, 3, 1, 2)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int, h: int) -> Image.Image:
    from skimage import data as skdata
    return Image.fromarray(skdata.astronaut()).resize((w, h), Image.Resampling.BICUBIC)


def rgba_sticker(w: int, h: int) -> Image.Image:
    """Clip art: transparent background whose hidden colour is not white, a half-transparent edge."""
    rng = np.random.default_rng(w * h)
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    a[: h // 3, :, 3] = 0                                           # fully transparent band
    a[h // 3: h // 2, :, 3] = 128
    return Image.fromarray(a, "RGBA")


def inputs() -> dict[str, tuple[bytes, dict]]:
    grey16 = Image.fromarray((np.arange(60 * 90, dtype=np.uint32).reshape(60, 90) * 12 % 65536).astype(np.uint16))
    pal = Image.new("P", (70, 50), 0)
    pal.putpalette([200, 30, 30] + [0, 90, 200] * 255)
    pal.paste(1, (10, 10, 40, 40))
    return {
        # a JPEG over twice the size the grid needs: evip would draft-decode it in torch mode
        "jpeg_4x": (encode(photo(900, 700), "JPEG", quality=90), {}),
        "jpeg_one_tile_8x": (encode(photo(1000, 1000), "JPEG"), {"max_tiles": 1}),
        "cmyk_jpeg": (encode(photo(300, 200).convert("CMYK"), "JPEG"), {}),
        "rgba_png": (encode(rgba_sticker(150, 90), "PNG"), {}),
        "la_png": (encode(rgba_sticker(60, 80).convert("LA"), "PNG"), {}),
        "palette_with_transparency": (encode(pal, "PNG", transparency=0), {}),
        "grey16_png": (encode(grey16, "PNG"), {"grey16": "clip"}),
        "bilevel_png": (encode(photo(120, 50).convert("1"), "PNG"), {}),
        "webp": (encode(photo(250, 130), "WEBP"), {}),
        "gif": (encode(photo(90, 140), "GIF"), {}),
    }


@pytest.mark.parametrize("name", sorted(inputs()))
def test_pil_mode_is_the_official_loader_pixel_for_pixel(name):
    raw, kw = inputs()[name]
    max_tiles = kw.pop("max_tiles", 6)
    cfg = ImageConfig(max_tiles=max_tiles, resize="pil", **kw)        # jpeg_draft stays at its default (on)
    ours = ImageProcessor(cfg, tile_size=56)(raw)
    ref = official_tiles(raw, 56, 1, max_tiles)
    assert ours.shape == ref.shape and torch.equal(ours, ref), name


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 900), h=st.integers(1, 900), lo=st.integers(1, 4), hi=st.integers(1, 12),
       n=st.integers(1, 5))
def test_multi_image_grids_follow_the_official_rule(w, h, lo, hi, n):
    """Each of n images gets at most max(1, max_tiles // n) tiles; min_tiles above that: one tile."""
    hi = max(lo, hi)
    proc = ImageProcessor(ImageConfig(min_tiles=lo, max_tiles=hi), tile_size=56)
    cap = per_image_max_tiles(hi, n)
    assert cap == max(1, hi // n)
    assert proc.grid(w, h, cap) == official_grid(w, h, 56, lo, cap)


def test_multi_image_fallback_is_one_tile_and_pixels_match():
    raw = encode(photo(400, 200), "PNG")
    proc = ImageProcessor(ImageConfig(min_tiles=2, max_tiles=4, resize="pil"), tile_size=56)
    cap = per_image_max_tiles(4, 3)                                  # 3 images share 4 tiles: 1 each
    grid = proc.grid(400, 200, cap)
    assert grid == (1, 1) and torch.equal(proc.render(raw, grid), official_tiles(raw, 56, 2, cap))


def test_alpha_setting_and_16_bit_grey():
    sticker = encode(rgba_sticker(56, 56), "PNG")
    assert ImageConfig().alpha == "drop"                            # the default: what serving does
    drop = ImageProcessor(ImageConfig(max_tiles=1, resize="pil"), tile_size=56)(sticker)
    white = ImageProcessor(ImageConfig(max_tiles=1, resize="pil", alpha="white"), tile_size=56)(sticker)
    assert torch.equal(drop, official_tiles(sticker, 56, 1, 1))
    assert (white[0, :, :18] == 255).all()                          # the transparent band is white
    assert not (drop[0, :, :18] == 255).all()                       # dropped: the hidden colours show
    # 16-bit grey: a fixed scale (levels mean the same in every image), not the image's own maximum
    g = np.full((56, 56), 4000, dtype=np.uint16)
    g[:, 28:] = 65535
    tiles = ImageProcessor(ImageConfig(max_tiles=1, resize="pil"), tile_size=56)(encode(Image.fromarray(g), "PNG"))
    assert tiles[0, 0, 0, 0] == round(4000 * 255 / 65535) == 16 and tiles[0, 0, 0, -1] == 255
    with pytest.raises(ValueError, match="image.alpha='black'"):
        ImageConfig(alpha="black")
