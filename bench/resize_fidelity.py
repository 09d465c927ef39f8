"""How far `image.resize: torch` is from Pillow's bicubic (`image.resize: pil`, the official pixels).

    .venv/bin/python bench/resize_fidelity.py [--tile 448]

Both resizes run in this one process on the same decoded pixels, through evip's own tiling
(grid, thumbnail) with the same grid, so only the bicubic differs. Families:
- photos: the real photos shipped offline (scikit-image), resized to 0.3-2 MP with various aspect
  ratios, up to 6 tiles + thumbnail (what web images look like);
- thin: strips (e.g. 3000 x 20, 20 x 1500), where one axis is stretched a lot and the other shrunk;
- near_one: sizes a few pixels off the grid (450 x 450 -> 448, 899 x 449 -> 896 x 448), where the
  kernels barely move the pixels and rounding differences show;
- noise: uniform noise (every pixel an edge), at ordinary, thin and near-grid sizes;
- clipart: hard black/white edges (checkerboards of 1-3 px), at thin and near-grid sizes: the
  worst case found.
Per family: the largest difference in levels (of 255), the share of differing values, and the
mean absolute difference. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image

from evip.data.images import ImageConfig, ImageProcessor


def photos() -> list[Image.Image]:
    from skimage import data as skdata
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "cat"]
    sizes = [(1500, 1000), (1000, 1500), (1200, 400), (640, 480), (800, 800), (1800, 1100), (700, 1400)]
    return [Image.fromarray(getattr(skdata, n)()).convert("RGB").resize(s, Image.Resampling.BICUBIC)
            for n, s in zip(names, sizes)]


def from_photo(sizes) -> list[Image.Image]:
    from skimage import data as skdata
    base = Image.fromarray(skdata.astronaut())
    return [base.resize(s, Image.Resampling.BICUBIC) for s in sizes]


def noise(sizes) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def clipart(sizes) -> list[Image.Image]:
    out = []
    for k, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        cell = 1 + k % 3
        a = (((x // cell) + (y // cell)) % 2 * 255).astype(np.uint8)
        out.append(Image.fromarray(np.stack([a, 255 - a, a], axis=-1)))
    return out


def family_stats(images: list[Image.Image], tile: int) -> dict:
    fast = ImageProcessor(ImageConfig(max_tiles=6, resize="torch", jpeg_draft=False), tile)
    exact = ImageProcessor(ImageConfig(max_tiles=6, resize="pil", jpeg_draft=False), tile)
    worst, differing, total, abs_sum, worst_size = 0, 0, 0, 0, None
    for im in images:
        buf = io.BytesIO()
        im.save(buf, "PNG")                      # lossless: both read the very same pixels
        raw = buf.getvalue()
        grid = exact.grid(*im.size)
        d = (fast.render(raw, grid).int() - exact.render(raw, grid).int()).abs()
        if int(d.max()) > worst:
            worst, worst_size = int(d.max()), list(im.size)
        differing += int((d > 0).sum())
        total += d.numel()
        abs_sum += float(d.sum())
    return {"max_levels": worst, "worst_size": worst_size, "share_differing": differing / total,
            "mean_abs_levels": abs_sum / total, "images": len(images)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tile", type=int, default=448)
    args = ap.parse_args()
    families = {
        "photos": photos(),
        "thin": from_photo([(3000, 20), (20, 1500), (2000, 60), (90, 2500), (1200, 8)]),
        "near_one": from_photo([(450, 450), (446, 446), (899, 449), (449, 899), (1346, 898), (452, 300)]),
        "noise": noise([(900, 600), (333, 777), (97, 61), (450, 450), (3000, 20), (20, 1500), (449, 899)]),
        "clipart": clipart([(450, 450), (446, 446), (899, 449), (3000, 20), (20, 1500), (90, 2500), (452, 300),
                            (900, 600), (460, 450)]),
    }
    out = {"tile": args.tile, **{name: family_stats(imgs, args.tile) for name, imgs in families.items()}}
    for name in families:
        print(f"{name:>9}: max {out[name]['max_levels']} levels (at {out[name]['worst_size']}), "
              f"{100 * out[name]['share_differing']:.2f}% of values differ, mean |diff| "
              f"{out[name]['mean_abs_levels']:.4f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
