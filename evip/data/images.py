"""Images: encoded bytes -> uint8 RGB tiles, with InternVL's dynamic tiling.

    proc = ImageProcessor(ImageConfig(max_tiles=6), tile_size=448)
    tiles = proc(jpeg_bytes)            # uint8 tensor [n_tiles, 3, 448, 448]

Order of work, cheapest first, so a bad image costs almost nothing:
1. `Image.open` reads only the header: size and format. An image whose header claims more than
   `bomb_pixels` pixels is refused (BadSample 'bomb') before a single pixel is decoded.
2. The tile grid is chosen from the header size with InternVL's `dynamic_preprocess` rule
   (`choose_grid`; identical, tie rule included).
3. JPEGs much larger than the target are decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`, DCT
   scaling), never below the size the grid and thumbnail need (`jpeg_draft`; off with
   `resize: pil`, whose point is the official pixels). Other formats decode in full.
4. Every mode becomes RGB as `Image.convert('RGB')` makes it, which is what the official
   InternVL loader and the serving stacks (vLLM, LMDeploy) do, with two settings:
   `image.alpha`: "drop" (default, as they do: a transparent pixel shows the colour stored
   under it, often black) or "white" (composited on white); `image.grey16`: 16-bit greyscale
   to 8 bits by the fixed factor 255/65535 ("scale", default: the picture as it looks) or
   "clip" (Pillow's own conversion, what the official loader gets: levels above 255 saturate
   to white). Opaque 8-bit greyscale is resized as one band and repeated over RGB at the cut
   (pixel-identical to converting first, 3x less resize work).
5. `max_pixels`: the grid is chosen for the image scaled down (aspect kept) to that many pixels.
6. Resize the decoded image straight to the grid with an antialiased bicubic, crop tiles
   row-major, append a thumbnail of the whole image when there is more than one tile.
   All tiles are written into one preallocated array (no intermediate copies).
   `image.resize` picks the bicubic: "torch" is torch's uint8 kernel on PIL's own buffer,
   vectorised for x86 AVX2/AVX-512 (3-6x faster than Pillow there; 2x slower elsewhere, e.g.
   ARM); it was made to match Pillow and does to within a few levels (of 255) on a small
   fraction of pixels, the same pixels on every CPU (measured over photos and noise:
   bench/README figures; the worst cases are thin images and near-1:1 rescales). "pil" is
   Pillow's `image.resize`, what InternVL calls, on the fully decoded image: bit-identical
   tiles for every input the official loader accepts (with `alpha: drop`, and `grey16: clip`
   for 16-bit greyscale). "auto" (default): "torch" where it is vectorised, else
   "pil" (`resolve_resize`; pin one for the same pixels on mixed CPU types).
7. No normalisation here: the tiles stay uint8 (4x less worker -> trainer shared memory and
   host -> device traffic than fp32); the model normalises them on its device with ImageNet
   mean/std (`evip.model.vision.normalise_pixels`). `normalise()` gives the same float values
   on the CPU (inspection, tests).

Anything PIL cannot decode (garbage, truncated bytes) raises BadSample('decode').
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evip.data.record import BadSample
from evip.model.vision import IMAGENET_MEAN, IMAGENET_STD, normalise_pixels

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageConfig", "ImageProcessor", "capped_size", "choose_grid",
           "cut_tiles", "decode", "open_header", "per_image_max_tiles", "pixels_view", "resize_bicubic",
           "resolve_resize",
           "target_ratios", "tile_image", "to_rgb", "torch_view"]


@dataclass
class ImageConfig:
    min_tiles: int = 1
    max_tiles: int = 6                 # InternVL SFT: 6 (+ thumbnail); inference often 12
    use_thumbnail: bool = True         # append a whole-image tile when the grid has > 1 tile
    max_pixels: int = 0                # 0: no cap; else scale images down to at most this many pixels
    bomb_pixels: int = 100_000_000     # header size above this: refused before decoding
    jpeg_draft: bool = True            # decode big JPEGs at reduced DCT scale (never with resize: pil)
    alpha: str = "drop"                # "drop": convert('RGB') as InternVL and vLLM/LMDeploy do; "white"
    grey16: str = "scale"              # 16-bit grey: "scale" (x 255/65535) or "clip" (Pillow's, official)
    split_tiles_across_images: bool = True  # multi-image: each image gets max_tiles // n_images (InternVL)
    resize: str = "auto"               # bicubic: "torch" (fast on AVX2, within a few levels of
                                       # Pillow), "pil" (InternVL's exact pixels) or "auto" (torch
                                       # on AVX2/AVX-512, else pil); see the module doc
    # The model normalises the uint8 tiles on its device with these (evip.model.vision); kept
    # as config keys so resolved configs of earlier runs still load, but only ImageNet's are valid.
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def __post_init__(self):
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"image.min_tiles={self.min_tiles} and image.max_tiles={self.max_tiles}: "
                             "need 1 <= min_tiles <= max_tiles")
        for key, value, ref in (("mean", self.mean, IMAGENET_MEAN), ("std", self.std, IMAGENET_STD)):
            if [float(v) for v in value] != list(ref):
                raise ValueError(f"image.{key}={list(value)}: the workers ship uint8 tiles and the model "
                                 f"normalises them with InternVL's ImageNet {key} {list(ref)} "
                                 "(evip.model.vision.normalise_pixels); remove the key or set those values")
        if self.alpha not in ("drop", "white"):
            raise ValueError(f"image.alpha={self.alpha!r}: 'drop' (what the official loader and the serving "
                             "stacks do: convert('RGB')) or 'white' (composite on white)")
        if self.grey16 not in ("scale", "clip"):
            raise ValueError(f"image.grey16={self.grey16!r}: 'scale' (x 255/65535) or 'clip' (Pillow's "
                             "convert, what the official loader gets)")
        if self.resize not in ("auto", "torch", "pil"):
            raise ValueError(f"image.resize={self.resize!r}: 'auto', 'torch' (fast on AVX2) or 'pil' "
                             "(InternVL's exact pixels)")


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """The candidate grids (columns, rows), built and ordered exactly as InternVL does:
    a set of (i, j) with min_num <= i*j <= max_num, sorted (stably) by i*j."""
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                 for j in range(1, n + 1) if min_num <= i * j <= max_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def choose_grid(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
    """(columns, rows) of InternVL's `find_closest_aspect_ratio`: the grid whose aspect ratio is
    closest to width/height; on a tie the later (larger) grid wins when the image area exceeds
    half the grid's pixel area."""
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for ratio in target_ratios(min_num, max_num):
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * tile * tile * ratio[0] * ratio[1]:
            best = ratio
    return best


def per_image_max_tiles(max_tiles: int, n_images: int, split: bool = True) -> int:
    """The tile cap of each of `n_images` images sharing `max_tiles` (InternVL's multi-image rule:
    max(1, max_tiles // n)); a cap below min_tiles leaves no candidate grid: one tile."""
    return max(1, max_tiles // n_images) if n_images and split else max_tiles


def resolve_resize(resize: str) -> str:
    """"auto" -> "torch" where torch's uint8 bicubic is vectorised (x86 AVX2 / AVX-512), else
    "pil"; "torch" and "pil" unchanged."""
    if resize != "auto":
        return resize
    return "torch" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else "pil"


def tile_image(img: Image.Image, tile: int, grid: tuple[int, int], use_thumbnail: bool,
               resize: str) -> np.ndarray:
    """InternVL's `dynamic_preprocess` on an RGB (or "L") image, as uint8 [n, 3, tile, tile]:
    resize to the grid (bicubic), cut row-major, the thumbnail (the whole image resized) last
    when the grid has more than one tile. `resize`: "torch" or "pil" (see `resolve_resize`)."""
    cols, rows = grid
    sizes = [(tile * cols, tile * rows)] + ([(tile, tile)] if use_thumbnail and rows * cols != 1 else [])
    src = torch_view(img) if resize == "torch" else img
    return cut_tiles(*(resize_bicubic(src, size, resize) for size in sizes), tile=tile, grid=grid)


def resize_bicubic(src: Image.Image | torch.Tensor, size: tuple[int, int], resize: str) -> np.ndarray:
    """Antialiased bicubic resize to `size` = (w, h), as [h, w, c] uint8 pixels. `src` is the
    PIL image ("pil") or its `torch_view` ("torch"; made once for both of an image's resizes)."""
    if resize == "pil":
        return pixels_view(src.resize(size, Image.Resampling.BICUBIC))
    out = F.interpolate(src, size=(size[1], size[0]), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()


def cut_tiles(grid_pixels: np.ndarray, thumb: np.ndarray | None = None, *, tile: int,
              grid: tuple[int, int]) -> np.ndarray:
    """[H, W, c] uint8 pixels of the grid-sized image (c = 1 grey, 3 RGB, or 4 RGBX: the 4th
    dropped) cut row-major, the thumbnail's [tile, tile, c] last, into one preallocated uint8
    [n, 3, tile, tile] array: each pixel copied once. Grey is repeated over the 3 channels
    (the same pixels as converting it to RGB)."""
    cols, rows = grid
    n = rows * cols
    out = np.empty((n + (thumb is not None), 3, tile, tile), dtype=np.uint8)
    g = grid_pixels[..., :3]
    out[:n].reshape(rows, cols, 3, tile, tile)[...] = g.reshape(rows, tile, cols, tile, g.shape[-1]).transpose(0, 2, 4, 1, 3)
    if thumb is not None:
        out[n] = thumb[..., :3].transpose(2, 0, 1)
    return out


def _zero_copy_pixels(im: Image.Image) -> np.ndarray | None:
    """[h, w, 4] (RGB, stored by PIL as RGBX) or [h, w, 1] ("L") uint8 read-only view of PIL's
    own buffer through its Arrow export; None when that is not possible (pyarrow missing,
    another mode, an image in several memory blocks)."""
    try:
        import pyarrow as pa
    except ImportError:
        return None
    if im.mode not in ("RGB", "L"):
        return None
    try:
        arr = pa.array(im)
        if isinstance(arr, pa.FixedSizeListArray):
            arr = arr.flatten()
        flat = arr.to_numpy(zero_copy_only=True)
    except (ValueError, TypeError, NotImplementedError, pa.ArrowException):
        return None                                    # e.g. a multi-block image
    channels = 1 if im.mode == "L" else 4
    if flat.size != im.width * im.height * channels:
        return None
    return flat.reshape(im.height, im.width, channels)


def pixels_view(im: Image.Image) -> np.ndarray:
    """[h, w, c] uint8 view of an RGB (c=3) or L (c=1) image. Zero-copy when the image is one
    memory block (`np.asarray` copies twice, via `tobytes`). Read it while `im` lives."""
    flat = _zero_copy_pixels(im)
    return flat[..., :3] if flat is not None else _copied_pixels(im)


def _copied_pixels(im: Image.Image) -> np.ndarray:
    """[h, w, c] uint8 copy of an RGB or "L" image (where no zero-copy view is possible)."""
    a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def torch_view(im: Image.Image) -> torch.Tensor:
    """uint8 [1, c, h, w] channels-last tensor over an RGB or "L" image's pixels, for
    `F.interpolate`: RGB as its 4 stored bytes per pixel (RGBX; torch's vectorised resize runs
    ~3x slower on the 3-of-4 strided view), without a copy when possible."""
    pixels = _zero_copy_pixels(im)
    if pixels is None:
        pixels = _copied_pixels(im)
    with warnings.catch_warnings():              # read-only buffer: interpolate only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def to_rgb(img: Image.Image, keep_grey: bool = False, alpha: str = "drop", grey16: str = "scale") -> Image.Image:
    """Any PIL mode -> RGB as `img.convert('RGB')` gives it (the official loader's rule), except:
    `alpha="white"` composites transparent pixels (RGBA, LA, PA, P with transparency) on white;
    `grey16="scale"` maps 16/32-bit greyscale to 8 bits by the fixed factor 255/65535 (Pillow
    clips at 255). `keep_grey`: opaque 8-bit greyscale stays "L" (resizing L then repeating it
    over 3 channels gives exactly the pixels of converting to RGB first, at a third of the cost)."""
    if alpha == "white":
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
    if grey16 == "scale" and img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
    if img.mode == "RGB" or (keep_grey and img.mode == "L"):
        return img
    return img.convert("RGB")


def capped_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(w, h) scaled down (aspect kept) so that w*h <= max_pixels; unchanged if already below."""
    if not max_pixels or width * height <= max_pixels:
        return width, height
    s = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * s)), max(1, int(height * s))


def open_header(data: bytes, bomb_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse bombs before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample("bomb", str(e)) from None
    except Exception as e:  # UnidentifiedImageError, truncated headers, ...
        raise BadSample("decode", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadSample("decode", f"header claims a {w}x{h} image")
    if w * h > bomb_pixels:
        raise BadSample("bomb", f"header claims {w}x{h} = {w * h} pixels > image.bomb_pixels={bomb_pixels}")
    return img


def decode(data: bytes | Image.Image, cfg: ImageConfig, need: tuple[int, int] | None = None,
           keep_grey: bool = False) -> Image.Image:
    """Bytes (or a header from `open_header`) -> RGB image (or "L" with `keep_grey`, see
    `to_rgb`), bomb-guarded. With `need` = (w, h)
    the smallest size still needed, a JPEG may be decoded at a reduced DCT scale (only when it
    is at least twice as large in both sides; never with `resize: pil`)."""
    img = data if isinstance(data, Image.Image) else open_header(data, cfg.bomb_pixels)
    if need is not None and cfg.jpeg_draft and cfg.resize != "pil" and img.format == "JPEG":
        if img.width >= 2 * need[0] and img.height >= 2 * need[1]:
            img.draft("RGB", need)   # picks the largest 1/2^k scale that stays >= need
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
        return to_rgb(img, keep_grey, cfg.alpha, cfg.grey16)
    except Image.DecompressionBombError as e:
        raise BadSample("bomb", str(e)) from None
    except Exception as e:  # OSError('image file is truncated'), SyntaxError, ValueError...
        raise BadSample("decode", f"{type(e).__name__}: {e}") from None


class ImageProcessor:
    """Encoded image -> uint8 tensor [n_tiles, 3, tile, tile]; see the module docstring."""

    def __init__(self, cfg: ImageConfig, tile_size: int):
        self.cfg = cfg
        self.tile = int(tile_size)
        self.resize = resolve_resize(cfg.resize)     # "torch" or "pil" on this CPU

    def header_size(self, data: bytes) -> tuple[int, int]:
        """(width, height) from the header only (bomb-guarded); for filters."""
        return open_header(data, self.cfg.bomb_pixels).size

    def grid(self, width: int, height: int, max_tiles: int | None = None) -> tuple[int, int]:
        """(columns, rows) for an image of this original size (after the max-pixels cap).
        `max_tiles` below `min_tiles` (several images sharing the budget) leaves no candidate grid:
        one tile, as InternVL's rule gives."""
        w, h = capped_size(width, height, self.cfg.max_pixels)
        return choose_grid(w, h, self.tile, self.cfg.min_tiles, max_tiles or self.cfg.max_tiles)

    def n_tiles(self, grid: tuple[int, int]) -> int:
        n = grid[0] * grid[1]
        return n + 1 if self.cfg.use_thumbnail and n > 1 else n

    def uint8_tiles(self, data: bytes, grid: tuple[int, int]) -> np.ndarray:
        """Decode (bomb-guarded, drafted when far too large) and tile on `grid` (columns, rows):
        uint8 [n_tiles(grid), 3, tile, tile]."""
        img = self.decode_for(open_header(data, self.cfg.bomb_pixels), grid)
        return tile_image(img, self.tile, grid, self.cfg.use_thumbnail, self.resize)

    def decode_for(self, head: Image.Image, grid: tuple[int, int]) -> Image.Image:
        """The header's image decoded for tiling on `grid`: drafted no smaller than the grid
        needs, grey kept as one band."""
        w, h = capped_size(*head.size, self.cfg.max_pixels)
        cols, rows = grid
        need = (self.tile * cols, self.tile * rows)
        if self.cfg.use_thumbnail and cols * rows > 1:
            need = (max(need[0], self.tile), max(need[1], self.tile))
        need = (min(need[0], w), min(need[1], h))   # never ask the decoder for more than the image
        # The grid comes from the (capped) header size; pixels are resized straight from the
        # decoded (possibly drafted) image to the grid: one resample, never a full-size detour.
        return decode(head, self.cfg, need, keep_grey=True)   # grey photos resize as 1 band, not 3

    @staticmethod
    def normalise(tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, S, S] -> fp32 (x / 255 - mean) / std: exactly what the model computes from
        the uint8 tiles on its device (for inspection and tests; the pipeline ships uint8)."""
        return normalise_pixels(torch.as_tensor(tiles))

    def render(self, data: bytes, grid: tuple[int, int]) -> torch.Tensor:
        """Tiles of `data` on a grid from `grid()`: uint8 tensor [n_tiles(grid), 3, tile, tile]."""
        return torch.from_numpy(self.uint8_tiles(data, grid))

    def __call__(self, data: bytes, max_tiles: int | None = None) -> torch.Tensor:
        """Header -> grid -> tiles: uint8 tensor [n_tiles, 3, tile, tile]."""
        return self.render(data, self.grid(*self.header_size(data), max_tiles))
