"""Data pipeline throughput per worker: the full per-sample pipeline vs. PIL decode alone.

    .venv/bin/python bench/data_throughput.py [--rounds 5] [--max-tiles 6 1] [--resize torch pil] [--tile 448]

Photos: the real photos shipped offline (scikit-image `skimage.data` + matplotlib's
grace_hopper.jpg), resized to about 1-2 MP (long side 1200-1800, various aspect ratios) and
re-encoded as JPEG q90, like LAION/COYO web images after img2dataset. Both measurements run in
this one process (one worker, torch on 1 thread), interleaved round by round over the same
files; the figure is the median over rounds. Times are this process's CPU time
(`time.process_time`), so other jobs sharing the machine do not skew the per-worker figures. Measured for max_tiles 6 (InternVL SFT: up to 6
tiles + thumbnail, ~1.3 MP of bicubic output per photo) and 1 (one 448 tile: draft decoding).
`ms_per_sample` breaks the pipeline down by stage.

- decode: `Image.open(bytes).convert("RGB")` (full decode; the floor any pipeline pays).
- pipeline: SampleBuilder (header + bomb guard, grid, draft decode, tile to uint8, tokenise
  the caption with the real SmolLM2 tokenizer, label mask) + Packer.add (pack into batches).
  The ImageNet normalisation is not a worker cost any more: workers ship uint8 tiles and the
  model normalises them on its device (evip.model.vision.normalise_pixels).
- `resize`: `image.resize`, the bicubic: "torch" (torch's uint8 kernel, vectorised on AVX2,
  within a few levels of Pillow; what the default "auto" picks on AVX2) or "pil" (Pillow:
  InternVL's exact pixels).
- `bound_over_decode`: decode_full / (decode + the two bicubic resizes), per sample: the best
  ratio any pipeline using this bicubic can reach on this CPU.

`restore`: bench/data_restore.py's figures (restore a loader state taken at step 10 vs one at
step 10000; goal about 1), so that the last line, one JSON object, carries both of the issue's figures.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import torch
from PIL import Image

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "stereo_motorcycle", "retina"]
CAPTIONS = ["an astronaut in a white suit holding a helmet, with the US flag behind her",
            "a cup of espresso on a red saucer on a wooden table", "a tabby cat looking at the camera",
            "a rocket on the launch pad at dusk", "thousands of distant galaxies in a deep field image",
            "a stained tissue sample under a microscope", "a red motorcycle parked in a garage",
            "a photograph of the back of a human eye", "a portrait of Grace Hopper in navy uniform"]


def real_photos(megapixels: tuple[float, ...] = (1.0, 1.5, 2.0)) -> list[bytes]:
    """JPEG bytes of the offline photos at about 1-2 MP (aspect ratios kept)."""
    import matplotlib.cbook
    from skimage import data as skdata
    arrays = []
    for name in PHOTOS:
        a = getattr(skdata, name)()
        arrays.append(a[0] if isinstance(a, tuple) else a)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = Image.open(fh).convert("RGB")
    images = [Image.fromarray(a).convert("RGB") for a in arrays] + [hopper]
    out = []
    for i, img in enumerate(images):
        mp = megapixels[i % len(megapixels)] * 1e6
        s = (mp / (img.width * img.height)) ** 0.5
        big = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode_only(files: list[bytes]) -> float:
    """Seconds to fully decode every file with PIL."""
    t0 = time.process_time()
    for data in files:
        Image.open(io.BytesIO(data)).convert("RGB")
    return time.process_time() - t0


def make_pipeline(tok, max_tiles: int, tile: int, token_budget: int, resize: str = "torch"):
    """(builder, packer) of the full per-sample pipeline, on the real tokenizer."""
    from evip.data.images import ImageConfig
    from evip.data.packing import Packer
    from evip.data.sample import SampleBuilder, SampleConfig
    from evip.model.config import ModelConfig
    from evip.model.tokens import IMG_CONTEXT
    model_cfg = ModelConfig(image_size=tile, vocab_size=len(tok),
                            img_context_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT), pad_token_id=0)
    builder = SampleBuilder(SampleConfig(max_length=token_budget,
                                         image=ImageConfig(max_tiles=max_tiles, resize=resize)),
                            tok, model_cfg)
    packer = Packer(token_budget, max_images_per_pack=4 * (max_tiles + 1), pad_id=0)
    return builder, packer


def pipeline(files: list[bytes], builder, packer) -> tuple[float, int, int]:
    """Seconds for decode+tile+normalise+tokenise+pack of every file; (seconds, tiles, batches)."""
    from evip.data.record import Record
    t0 = time.process_time()
    tiles = batches = 0
    for i, data in enumerate(files):
        rec = Record(key=str(i), source="bench", shard="mem", kind="caption", images=[data],
                     text=CAPTIONS[i % len(CAPTIONS)])
        sample = builder(rec)
        tiles += sample.pixel_values.shape[0]
        batches += len(packer.add(sample, position=i))
    return time.process_time() - t0, tiles, batches


def stage_breakdown(files: list[bytes], builder, rounds: int) -> dict:
    """Milliseconds per sample of each stage run on its own (decode as the pipeline does it,
    bicubic resize to the grid, thumbnail resize, cut into tiles, tokenise+labels; median over
    rounds) to show where the pipeline's time goes; plus the full decode-only time."""
    from evip.data.images import cut_tiles, open_header, resize_bicubic, torch_view
    from evip.data.text import assemble, caption_segments
    proc, resize = builder.images, builder.images.resize
    keys = ("decode_full", "decode", "resize_grid", "resize_thumbnail", "cut", "tokenise")
    per_round = []
    for _ in range(rounds):
        ms = dict.fromkeys(keys, 0.0)
        for i, data in enumerate(files):
            head = open_header(data, proc.cfg.bomb_pixels)
            grid = proc.grid(*head.size)
            t = [time.process_time()]
            Image.open(io.BytesIO(data)).convert("RGB")
            t.append(time.process_time())
            img = proc.decode_for(head, grid)
            src = torch_view(img) if resize == "torch" else img
            t.append(time.process_time())
            resized = resize_bicubic(src, (proc.tile * grid[0], proc.tile * grid[1]), resize)
            t.append(time.process_time())
            thumb = None
            if proc.n_tiles(grid) > grid[0] * grid[1]:
                thumb = resize_bicubic(src, (proc.tile, proc.tile), resize)
            t.append(time.process_time())
            tiles = cut_tiles(resized, thumb, tile=proc.tile, grid=grid)
            t.append(time.process_time())
            assemble(builder.ids, caption_segments(builder.ids, CAPTIONS[i % len(CAPTIONS)], [tiles.shape[0]]), 8192)
            t.append(time.process_time())
            for k, a, b in zip(keys, t, t[1:]):
                ms[k] += (b - a) * 1000 / len(files)
        per_round.append(ms)
    med = {k: statistics.median(r[k] for r in per_round) for k in keys}
    out = {k: round(v, 1) for k, v in med.items()}
    out["bound_over_decode"] = round(med["decode_full"] / (med["decode"] + med["resize_grid"]
                                                           + med["resize_thumbnail"]), 3)
    return out


def sample_pipeline_vs_decode(files: list[bytes], builder, packer, rounds: int) -> dict:
    pipeline(files[:2], builder, packer)                    # warm-up (lazy imports, caches)
    decode_only(files[:2])
    dec, full, tiles = [], [], 0
    for _ in range(rounds):                                 # interleaved: same files, same conditions
        dec.append(len(files) / decode_only(files))
        secs, tiles, _ = pipeline(files, builder, packer)
        full.append(len(files) / secs)
    return {"max_tiles": builder.cfg.image.max_tiles, "resize": builder.cfg.image.resize,
            "tiles_per_sample": round(tiles / len(files), 2),
            "decode_samples_per_s": round(statistics.median(dec), 1),
            "pipeline_samples_per_s": round(statistics.median(full), 1),
            "pipeline_over_decode": round(statistics.median(f / d for f, d in zip(full, dec)), 3),
            "packing_efficiency": round(packer.stats.efficiency, 3),
            "ms_per_sample": stage_breakdown(files, builder, rounds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tile", type=int, default=448)
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--max-tiles", type=int, nargs="+", default=[6, 1],
                    help="tile settings to measure (6: InternVL SFT; 1: one 448 tile, drafted decode)")
    ap.add_argument("--resize", nargs="+", default=["torch", "pil"], choices=["torch", "pil"],
                    help="image.resize values (torch: fast on AVX2, the default there; pil: InternVL's exact pixels)")
    ap.add_argument("--restore-steps", type=int, default=10000,
                    help="also time restoring the loader at step 10 vs this step (bench/data_restore.py); 0: skip")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from evip.assets import smollm2
    from evip.model.tokens import load_tokenizer
    tok = load_tokenizer(smollm2())
    files = real_photos()
    sizes = [Image.open(io.BytesIO(f)).size for f in files]
    result = {"photos": len(files), "megapixels_mean": round(sum(w * h for w, h in sizes) / len(sizes) / 1e6, 2),
              "tile": args.tile, "pixel_values": "uint8", "goal_pipeline_over_decode": 0.7, "per_worker": []}
    for max_tiles in args.max_tiles:
        for resize in args.resize:
            builder, packer = make_pipeline(tok, max_tiles, args.tile, args.token_budget, resize)
            result["per_worker"].append(sample_pipeline_vs_decode(files, builder, packer, args.rounds))
    if args.restore_steps:
        from data_restore import restore_ratio                 # bench/ is on sys.path (this script's dir)
        result["restore"] = restore_ratio(args.restore_steps)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
