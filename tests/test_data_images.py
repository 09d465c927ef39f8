"""Image tiling equals InternVL's dynamic_preprocess; decoding guards; normalisation."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from evip.data.images import (IMAGENET_MEAN, IMAGENET_STD, ImageConfig, ImageProcessor, capped_size,
                              choose_grid, decode)
from evip.data.record import BadSample


# ---- the reference: InternVL's code (internvl_chat/internvl/train/dataset.py), verbatim logic ----
def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_grid(orig_width, orig_height, min_num, max_num, image_size):
    aspect_ratio = orig_width / orig_height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height, image_size)


def ref_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    target_aspect_ratio = ref_grid(orig_width, orig_height, min_num, max_num, image_size)
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = ((i % (target_width // image_size)) * image_size,
               (i // (target_width // image_size)) * image_size,
               ((i % (target_width // image_size)) + 1) * image_size,
               ((i // (target_width // image_size)) + 1) * image_size)
        processed_images.append(resized_img.crop(box))
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size)))
    return processed_images
# ---------------------------------------------------------------------------------------------


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def as_uint8(tiles: list[Image.Image]) -> torch.Tensor:
    """InternVL's PIL crops as uint8 [n, 3, S, S] (ToTensor's layout, before its / 255)."""
    return torch.from_numpy(np.stack([np.asarray(t.convert("RGB")) for t in tiles])).permute(0, 3, 1, 2)


def normalised(tiles: list[Image.Image]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(t, dtype=np.float32) / 255.0 for t in tiles])).permute(0, 3, 1, 2)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@settings(max_examples=600, deadline=None)
@given(w=st.integers(1, 12000), h=st.integers(1, 12000), min_num=st.integers(1, 3),
       extra=st.integers(0, 11), tile=st.sampled_from([28, 224, 448]))
def test_grid_equals_internvl(w, h, min_num, extra, tile):
    max_num = min_num + extra
    assert choose_grid(w, h, tile, min_num, max_num) == ref_grid(w, h, min_num, max_num, tile)


@pytest.mark.parametrize("w,h,max_num", [(448 * 3, 448, 12), (600, 400, 6), (448, 448, 12), (1000, 1000, 12),
                                         (896, 896, 12), (300, 200, 12), (4000, 100, 6)])
def test_grid_ties_follow_the_area_rule(w, h, max_num):
    # exact ties (same aspect, different area) are where the 0.5 * area rule decides
    assert choose_grid(w, h, 448, 1, max_num) == ref_grid(w, h, 1, max_num, 448)


@settings(max_examples=40, deadline=None)
@given(w=st.integers(8, 220), h=st.integers(8, 220), max_num=st.integers(1, 6),
       thumb=st.booleans(), seed=st.integers(0, 3))
def test_tiles_equal_internvl_pixels(w, h, max_num, thumb, seed):
    img = noise_image(w, h, seed)
    proc = ImageProcessor(ImageConfig(min_tiles=1, max_tiles=max_num, use_thumbnail=thumb, resize="pil"), tile_size=28)
    ours = proc(png_bytes(img))
    ref = ref_dynamic_preprocess(img, 1, max_num, 28, use_thumbnail=thumb)
    assert ours.dtype == torch.uint8 and ours.shape == (len(ref), 3, 28, 28)
    assert torch.equal(ours, as_uint8(ref))                          # pixel for pixel
    torch.testing.assert_close(proc.normalise(ours), normalised(ref), rtol=0, atol=1e-5)


def test_thumbnail_only_when_more_than_one_tile():
    proc = ImageProcessor(ImageConfig(max_tiles=6, use_thumbnail=True, resize="pil"), tile_size=28)
    square = noise_image(28, 28, 0)
    assert proc(png_bytes(square)).shape[0] == 1                    # 1x1 grid: no thumbnail
    wide = noise_image(84, 28, 1)
    tiles = proc(png_bytes(wide))
    assert tiles.shape[0] == 3 + 1                                   # 3x1 grid + thumbnail last
    thumb = wide.resize((28, 28), Image.Resampling.BICUBIC)
    assert torch.equal(tiles[-1:], as_uint8([thumb]))
    no_thumb = ImageProcessor(ImageConfig(max_tiles=6, use_thumbnail=False, resize="pil"), tile_size=28)
    assert no_thumb(png_bytes(wide)).shape[0] == 3
    assert proc.n_tiles((3, 1)) == 4 and proc.n_tiles((1, 1)) == 1 and no_thumb.n_tiles((3, 1)) == 3


def test_max_pixels_caps_the_grid():
    img = Image.new("RGB", (2000, 2000), (10, 200, 30))      # flat: cheap to encode, same grid rule
    big = ImageProcessor(ImageConfig(max_tiles=12), tile_size=448)
    capped = ImageProcessor(ImageConfig(max_tiles=12, max_pixels=448 * 448), tile_size=448)
    assert big.grid(2000, 2000) == (3, 3) == ref_grid(2000, 2000, 1, 12, 448)
    assert capped_size(2000, 2000, 448 * 448) == (448, 448)
    assert capped.grid(2000, 2000) == (1, 1) == ref_grid(448, 448, 1, 12, 448)
    assert capped(png_bytes(img)).shape == (1, 3, 448, 448)
    w, h = capped_size(3000, 1000, 1_000_000)
    assert w * h <= 1_000_000 and abs(w / h - 3) < 0.01


def test_jpeg_draft_decodes_smaller_and_stays_close():
    from skimage import data as skdata
    photo = Image.fromarray(skdata.astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC)
    raw = jpeg_bytes(photo)
    cfg = ImageConfig(max_tiles=1)
    assert decode(raw, cfg, need=(448, 448)).size == (512, 512)       # DCT scale 1/4
    assert decode(raw, cfg).size == (2048, 2048)
    drafted = ImageProcessor(cfg, tile_size=448)(raw)
    full = ImageProcessor(ImageConfig(max_tiles=1, jpeg_draft=False), tile_size=448)(raw)
    assert drafted.shape == full.shape == (1, 3, 448, 448)
    assert (ImageProcessor.normalise(drafted) - ImageProcessor.normalise(full)).abs().mean() < 0.05


def test_alpha_composited_on_white_and_modes_become_rgb():
    proc = ImageProcessor(ImageConfig(max_tiles=1, alpha="white"), tile_size=28)
    white = as_uint8([Image.new("RGB", (28, 28), (255, 255, 255))])
    clear = Image.new("RGBA", (28, 28), (10, 20, 30, 0))
    assert torch.equal(proc(png_bytes(clear)), white)
    pal = Image.new("P", (28, 28), 0)
    pal.putpalette([0, 0, 0] * 256)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    assert torch.equal(proc(buf.getvalue()), white)
    grey = Image.new("L", (28, 28), 128)
    assert torch.equal(proc(png_bytes(grey)), as_uint8([Image.new("RGB", (28, 28), (128,) * 3)]))


def test_imagenet_normalisation_values():
    proc = ImageProcessor(ImageConfig(max_tiles=1), tile_size=28)
    raw = proc(png_bytes(Image.new("RGB", (28, 28), (255, 0, 128))))
    assert raw.dtype == torch.uint8 and raw[0, :, 0, 0].tolist() == [255, 0, 128]
    x = proc.normalise(raw)
    expect = [(1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], (0.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1],
              (128 / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]]
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((28, 28), expect[c]), atol=1e-5)


def crafted_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC), with one tiny IDAT and IEND."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_bomb_header_refused_before_decoding():
    proc = ImageProcessor(ImageConfig(), tile_size=448)
    t0 = time.perf_counter()
    with pytest.raises(BadSample) as e:
        proc(crafted_png_header(30000, 30000))
    assert e.value.reason == "bomb" and "900000000" in e.value.detail
    assert time.perf_counter() - t0 < 0.5                               # nothing was decoded
    with pytest.raises(BadSample) as e:
        ImageProcessor(ImageConfig(bomb_pixels=100 * 100), tile_size=28)(png_bytes(noise_image(101, 100, 0)))
    assert e.value.reason == "bomb"


@pytest.mark.parametrize("raw", [b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 10, b"", b"GIF89a garbage"],
                         ids=["garbage_jpg", "empty", "garbage_gif"])
def test_undecodable_bytes_raise_decode(raw):
    with pytest.raises(BadSample) as e:
        ImageProcessor(ImageConfig(), tile_size=28)(raw)
    assert e.value.reason == "decode"


def test_truncated_image_bytes_raise_decode():
    raw = jpeg_bytes(noise_image(300, 200, 3))
    for cut in (len(raw) // 2, 400):
        with pytest.raises(BadSample) as e:
            ImageProcessor(ImageConfig(), tile_size=28)(raw[:cut])
        assert e.value.reason == "decode"
    png = png_bytes(noise_image(120, 90, 4))
    with pytest.raises(BadSample) as e:
        ImageProcessor(ImageConfig(), tile_size=28)(png[: len(png) // 2])
    assert e.value.reason == "decode"


@settings(max_examples=40, deadline=None)
@given(w=st.integers(8, 220), h=st.integers(8, 220), max_num=st.integers(1, 6), seed=st.integers(0, 3))
def test_torch_resize_is_internvl_tiling_within_a_few_levels(w, h, max_num, seed):
    # noise is the worst case for a bicubic (every pixel an edge): same grid and tiles, and the
    # pixels close to Pillow's on average
    img = noise_image(w, h, seed)
    ours = ImageProcessor(ImageConfig(max_tiles=max_num), tile_size=28)(png_bytes(img))
    ref = as_uint8(ref_dynamic_preprocess(img, 1, max_num, 28, use_thumbnail=True))
    assert ours.shape == ref.shape
    assert (ours.int() - ref.int()).abs().float().mean() < 1.0


@pytest.mark.parametrize("size,max_num", [((1500, 1000), 6), ((1000, 1500), 6), ((1200, 400), 12),
                                          ((640, 480), 6), ((2048, 2048), 1)])
def test_torch_resize_of_a_real_photo_is_pillow_within_3_levels(size, max_num):
    from skimage import data as skdata
    photo = Image.fromarray(skdata.astronaut()).resize(size, Image.Resampling.BICUBIC)
    raw = jpeg_bytes(photo)
    proc = ImageProcessor(ImageConfig(max_tiles=max_num, jpeg_draft=False), tile_size=448)
    fast = proc(raw)
    exact = ImageProcessor(ImageConfig(max_tiles=max_num, jpeg_draft=False, resize="pil"), tile_size=448)(raw)
    assert torch.equal(exact, as_uint8(ref_dynamic_preprocess(Image.open(io.BytesIO(raw)).convert("RGB"), 1,
                                                               max_num, 448, use_thumbnail=True)))
    diff = (fast.int() - exact.int()).abs()
    assert fast.shape == exact.shape and diff.max() <= 3 and (diff > 0).float().mean() < 0.1
    threads = torch.get_num_threads()
    try:                                              # the same bytes however many threads resize
        torch.set_num_threads(1)
        assert torch.equal(proc(raw), fast)
    finally:
        torch.set_num_threads(threads)


def test_resize_key_is_checked():
    with pytest.raises(ValueError, match="image.resize='cv2'"):
        ImageConfig(resize="cv2")


def test_auto_resize_is_torch_only_where_torch_is_vectorised():
    """Without AVX2 torch's uint8 bicubic is ~2x slower than Pillow's: "auto" then takes Pillow
    (InternVL's exact pixels). Checked in a child process whose torch runs without AVX2."""
    import os
    import subprocess
    import sys
    vectorised = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert ImageProcessor(ImageConfig(), tile_size=28).resize == ("torch" if vectorised else "pil")
    code = ("import torch\nfrom evip.data.images import ImageConfig, ImageProcessor\n"
            "print(torch.backends.cpu.get_cpu_capability(), ImageProcessor(ImageConfig(), 28).resize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}).stdout.split()
    assert out == ["DEFAULT", "pil"]


@pytest.mark.parametrize("w,h,max_num", [(150, 100, 6), (40, 90, 4), (28, 28, 1)])
def test_grey_images_resized_as_one_band_equal_rgb_pixels(w, h, max_num):
    rng = np.random.default_rng(w)
    grey = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    exact = ImageProcessor(ImageConfig(max_tiles=max_num, resize="pil"), tile_size=28)(png_bytes(grey))
    ref = ref_dynamic_preprocess(grey.convert("RGB"), 1, max_num, 28, use_thumbnail=True)
    assert exact.shape == (len(ref), 3, 28, 28) and torch.equal(exact, as_uint8(ref))
    fast = ImageProcessor(ImageConfig(max_tiles=max_num), tile_size=28)
    assert torch.equal(fast(png_bytes(grey)), fast(png_bytes(grey.convert("RGB"))))
    assert decode(png_bytes(grey), ImageConfig(), keep_grey=True).mode == "L"
    assert decode(png_bytes(grey), ImageConfig()).mode == "RGB"


@pytest.mark.parametrize("mode,size", [("RGB", (97, 61)), ("RGB", (1, 1)), ("L", (64, 33)), ("RGBA", (7, 5))])
def test_pixels_view_equals_numpy_asarray(mode, size):
    from evip.data.images import pixels_view
    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + ((len(mode),) if len(mode) > 1 else ())
    im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    ref = np.asarray(im)
    view = pixels_view(im)
    assert np.array_equal(view, ref[..., None] if ref.ndim == 2 else ref)


def test_only_imagenet_mean_std_are_accepted():
    assert ImageConfig(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]).mean == list(IMAGENET_MEAN)
    with pytest.raises(ValueError, match="image.mean"):
        ImageConfig(mean=[0.5, 0.5, 0.5])


_TILES_DIGEST = """
import hashlib, io
import numpy as np
import torch
from PIL import Image
from evip.data.images import ImageConfig, ImageProcessor
rng = np.random.default_rng(0)
digest = hashlib.sha256()
for w, h in [(900, 600), (333, 777), (97, 61)]:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO(); img.save(buf, "PNG")
    for max_tiles in (1, 6):
        tiles = ImageProcessor(ImageConfig(max_tiles=max_tiles, resize="torch"), 448)(buf.getvalue())
        digest.update(tiles.numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), digest.hexdigest())
"""


def test_torch_resize_gives_the_same_pixels_on_every_cpu_capability():
    """torch's uint8 bicubic is integer arithmetic: the same tiles from its AVX-512, AVX2 and
    plain kernels (child processes with ATEN_CPU_CAPABILITY), so mixed clusters agree."""
    import os
    import subprocess
    import sys
    runs = {}
    for cap in ("", "avx2", "default"):
        out = subprocess.run([sys.executable, "-c", _TILES_DIGEST], capture_output=True, text=True, check=True,
                             env={**os.environ, "ATEN_CPU_CAPABILITY": cap}, timeout=120).stdout.split()
        runs[out[0]] = out[1]
    assert "DEFAULT" in runs and len(runs) >= 2, runs
    assert len(set(runs.values())) == 1, runs
