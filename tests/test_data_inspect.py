"""`evip data inspect`: real shards (built by `evip data build`) through the real loader."""
from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from evip.cli import main as evip_main

from evip.data.build import BuildConfig, build_shards
from evip.data.images import ImageConfig, ImageProcessor
from evip.data.inspect import infer_grid

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field"]


def photo(name: str, size=(300, 200)) -> bytes:
    from skimage import data as skdata
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def bomb_png() -> bytes:
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    photos = root / "photos"
    photos.mkdir()
    for i, name in enumerate(PHOTOS):
        (photos / f"{name}.jpg").write_bytes(photo(name, (300 + 100 * (i % 3), 200 + 150 * (i % 2))))
        (photos / f"{name}.txt").write_text(f"a real photo: {name.replace('_', ' ')}")
    build_shards(BuildConfig(input=str(photos), out=str(root / "captions"), samples_per_shard=4, progress=False))
    # a hand-written noisy shard: garbage bytes named .jpg, a bomb header, a missing caption
    with wds.TarWriter(str(root / "captions" / "noisy-000000.tar"), encoder=False, mtime=0.0) as w:
        w.write({"__key__": "g", "jpg": b"\xff\xd8\xff garbage", "txt": b"garbage"})
        w.write({"__key__": "b", "png": bomb_png(), "txt": b"a bomb"})
        w.write({"__key__": "m", "jpg": photo("coffee"), "json": b"{}"})
    img_dir = root / "chat_images"
    img_dir.mkdir()
    (img_dir / "cat.jpg").write_bytes(photo("chelsea"))
    conv = [{"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A cat."}]
    lines = [{"id": f"c{i}", "image": "cat.jpg", "conversations": conv} for i in range(6)]
    (root / "chat.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    build_shards(BuildConfig(input=str(root / "chat.jsonl"), out=str(root / "chats"), root=str(img_dir), progress=False))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
name: inspect_test
sources:
  - name: captions
    kind: caption
    format: webdataset
    template: caption
    weight: 3.0
    paths: ["{root}/captions/*.tar"]
  - name: chats
    kind: chat
    format: webdataset
    template: chat
    weight: 1.0
    paths: ["{root}/chats/*.tar"]
""")
    return recipe


def test_inspect_cli_reports_and_draws(recipe, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    rc = evip_main(["data", "inspect", str(recipe), "num_workers=0", "token_budget=256", "rows=2",
                    "max_images_per_pack=32", "sample.image.max_tiles=6", "--batches", "6",
                    "--sheet", str(sheet), "--sheet-samples", "8", "--tile-size", "56"])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"recipe inspect_test: 6 micro-batches of 2 x 256 tokens, \d+ samples, packing efficiency 0\.\d+", out)
    rows = {m[0]: (int(m[1]), float(m[2]), float(m[3]), m[4])
            for m in re.findall(r"^(captions|chats) +(\d+) +([\d.]+) +([\d.]+) +(.*)$", out, re.M)}
    assert set(rows) == {"captions", "chats"} and all(r[0] > 0 for r in rows.values())
    assert rows["captions"][1] + rows["chats"][1] == pytest.approx(1.0, abs=0.002)
    assert (rows["captions"][2], rows["chats"][2]) == (0.75, 0.25)
    # the noisy shard: garbage jpg, bomb header, missing caption are skipped and counted
    assert re.fullmatch(r"bomb: \d+, decode: \d+, missing_field: \d+", rows["captions"][3])
    assert rows["chats"][3] == "-"
    assert "tokens per sample:" in out and "tiles per sample:" in out
    # 4 tokens per 56 px tile: a caption sample is 4 * tiles + 3 image-block tokens + caption
    tiles = [int(m) for m in re.findall(r"^ +(\d+)-\1 +\|", out.split("tiles per sample:")[1], re.M)]
    assert tiles and max(tiles) <= 7
    assert Image.open(sheet).size == (4 * 320, 2 * (320 + 150))


def test_infer_grid_recovers_the_tiling():
    from skimage import data as skdata
    buf = io.BytesIO()
    Image.fromarray(skdata.coffee()).resize((900, 600)).save(buf, "PNG")
    proc = ImageProcessor(ImageConfig(max_tiles=6), tile_size=56)
    assert proc.grid(900, 600) == (3, 2)
    assert infer_grid(proc(buf.getvalue())) == (3, 2, True)
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((300, 900)).save(buf, "PNG")
    assert infer_grid(proc(buf.getvalue())) == (*proc.grid(300, 900), True)


def test_inspect_targets_resolve(recipe, tmp_path):
    """A shard folder, a glob, a stage file and a stage of a pipeline: what the loader is given."""
    from evip.config import ConfigError
    from evip.data.inspect_target import inspect_target
    root = recipe.parent
    t = inspect_target(str(root / "chats"), workdir=str(tmp_path))
    assert t.what == f"shards {root / 'chats'}/*.tar (chat)"                  # kind from the manifest
    from evip.data.recipe import load_recipe
    assert load_recipe(t.data.recipe).sources[0].kind == "chat"
    t = inspect_target(str(root / "captions" / "shard-*.tar"), overrides=["token_budget=256"], workdir=str(tmp_path))
    assert t.what.endswith("(caption)") and t.data.token_budget == 256
    stage, pipeline = stage_files(recipe, tmp_path)
    t = inspect_target(str(stage))
    assert (t.data.token_budget, t.data.sample.image.max_tiles, t.tile_size) == (200, 2, None)
    t = inspect_target(str(pipeline), "first")
    assert (t.data.token_budget, t.data.sample.filters.max_caption_chars, t.tile_size) == (300, 12, 28)
    with pytest.raises(ConfigError, match=r"pass --stage NAME \(one of first\)"):
        inspect_target(str(pipeline))
    with pytest.raises(ConfigError, match="no such recipe, stage or pipeline file"):
        inspect_target(str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="no \\*.tar shards in the folder"):
        inspect_target(str(tmp_path))


def stage_files(recipe: Path, where: Path) -> tuple[Path, Path]:
    stage = where / "stage.yaml"
    stage.write_text(f"name: s1\ntrainable: [patch_embed]\nsteps: 1\nprecision: fp32\n"
                     f"data: {{recipe: {recipe}, token_budget: 200, rows: 1, num_workers: 0,\n"
                     f"  sample: {{image: {{min_tiles: 1, max_tiles: 2}}, filters: {{max_caption_chars: 12}}}}}}\n")
    pipeline = where / "pipeline.yaml"
    pipeline.write_text("model: {image_size: 28, patch_size: 14}\nstages:\n"
                        "  - {name: first, file: stage.yaml, overrides: [data.token_budget=300]}\n")
    return stage, pipeline


def test_inspect_cli_pipeline_stage_uses_its_tiles_and_filters(recipe, tmp_path, tmp_path_factory, capsys):
    from trainer_helpers import prepared_tokenizer      # the session's saved SmolLM2 tokenizer (fast)
    tok = prepared_tokenizer(tmp_path_factory.getbasetemp())
    _, pipeline = stage_files(recipe, tmp_path)
    rc = evip_main(["data", "inspect", str(pipeline), "--stage", "first", "--batches", "3", "--sheet", "",
                    "--tokenizer", str(tok)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"inspect stage s1 of {pipeline}: tiles of 28 px, 1-2 per image, token budget 300" in out
    assert "1 x 300 tokens" in out
    # the stage's filter (captions up to 12 chars) drops the photo captions: counted as caption_length
    assert re.search(r"^captions .*caption_length: [1-9]", out, re.M)
