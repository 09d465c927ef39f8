"""`evip data build`: folder, jsonl and parquet inputs -> readable webdataset shards + manifest."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from evip.cli import main as evip_main
from evip.data.build import BuildConfig, build_shards

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera"]


def photo_bytes(name: str, fmt: str = "JPEG", size=(160, 120)) -> bytes:
    from skimage import data as skdata
    img = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def read_shards(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["path"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def check_manifest(out: Path, count: int) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == count == sum(s["count"] for s in manifest["shards"])
    for s in manifest["shards"]:
        data = (out / s["path"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["bytes"] == sum(s["bytes"] for s in manifest["shards"])
    return manifest


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    for i, name in enumerate(PHOTOS):
        where = root / "sub" if i % 2 else root
        ext, fmt = ("png", "PNG") if i == 1 else ("webp", "WEBP") if i == 2 else ("jpg", "JPEG")
        (where / f"{name}.{ext}").write_bytes(photo_bytes(name, fmt))
        (where / f"{name}.txt").write_text(f"a photo called {name}\n")
    (root / "nocaption.jpg").write_bytes(photo_bytes("astronaut"))         # no caption file
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff not an image at all")
    (root / "garbage.txt").write_text("a caption for garbage")
    Image.fromarray(__import__("numpy").zeros((8, 8, 3), "uint8")).save(root / "odd.bmp")   # no caption
    (root / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")            # unsupported
    (root / "logo.txt").write_text("a caption whose picture is an SVG")
    (root / "orphan.txt").write_text("a caption with no picture at all")
    return root


def test_build_from_folder(folder, tmp_path):
    out = tmp_path / "shards"
    result = build_shards(BuildConfig(input=str(folder), out=str(out), samples_per_shard=2, progress=False))
    assert result.kind == "caption" and result.skipped == {
        "missing_caption": 2, "bad_image": 1, "unsupported_format": 1, "caption_without_picture": 2}
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    status = {r["input"]: (r["status"], r.get("reason")) for r in report}
    assert status == {**{f"{'sub/' if i % 2 else ''}{n}.{'png' if i == 1 else 'webp' if i == 2 else 'jpg'}": ("train", None)
                         for i, n in enumerate(PHOTOS)},
                      "nocaption.jpg": ("skipped", "missing_caption"), "odd.bmp": ("skipped", "missing_caption"),
                      "garbage.jpg": ("skipped", "bad_image"), "logo.svg": ("skipped", "unsupported_format"),
                      "logo.txt": ("skipped", "caption_without_picture"),
                      "orphan.txt": ("skipped", "caption_without_picture")}     # every file but used captions
    assert result.inputs == len(report) == 11
    manifest = check_manifest(out, 5)
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 1] and manifest["format"] == "folder"
    samples = read_shards(out)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]
    by_name = {json.loads(s["json"])["source_path"]: s for s in samples}
    for i, name in enumerate(PHOTOS):
        ext = "png" if i == 1 else "webp" if i == 2 else "jpg"
        rel = f"{'sub/' if i % 2 else ''}{name}.{ext}"
        s = by_name[rel]
        assert s[ext] == (folder / rel).read_bytes()                          # bytes copied as they are
        assert s["txt"].decode() == f"a photo called {name}"
    # the same input gives byte-identical shards
    again = tmp_path / "again"
    build_shards(BuildConfig(input=str(folder), out=str(again), samples_per_shard=2, progress=False))
    assert json.loads((again / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_build_from_jsonl_chats(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(photo_bytes("coffee"))
    (root / "b.png").write_bytes(photo_bytes("chelsea", "PNG"))
    (root / "c.gif").write_bytes(photo_bytes("rocket", "GIF"))
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A thing."}]
    lines = [{"id": "one", "image": "a.jpg", "conversations": conv},
             {"id": "two", "image": ["a.jpg", "b.png"], "conversations": conv},
             {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
             {"id": "gif", "image": "c.gif", "conversations": conv},
             {"id": "lost", "image": "missing.jpg", "conversations": conv},
             {"id": "empty", "image": "a.jpg"}]
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    out = tmp_path / "shards"
    result = build_shards(BuildConfig(input=str(jsonl), out=str(out), root=str(root), progress=False))
    assert result.kind == "chat"
    assert result.skipped == {"missing_image": 1, "missing_conversations": 1, "bad_json": 1}
    check_manifest(out, 4)
    samples = {json.loads(s["json"])["id"]: s for s in read_shards(out)}
    assert set(samples) == {"one", "two", "text", "gif"}
    assert json.loads(samples["one"]["json"])["conversations"] == conv
    assert samples["one"]["jpg"] == (root / "a.jpg").read_bytes()
    two = samples["two"]
    assert two["0.jpg"] == (root / "a.jpg").read_bytes() and two["1.png"] == (root / "b.png").read_bytes()
    assert not any(k.endswith(("jpg", "png", "webp")) for k in samples["text"])   # text-only chat
    gif = Image.open(io.BytesIO(samples["gif"]["png"]))                           # re-encoded to PNG
    assert gif.format == "PNG" and gif.size == (160, 120)
    # our own shard reader gives the multi-image sample's images back in prompt order
    from evip.data.recipe import SourceConfig
    from evip.data.sources import TarSource
    source = TarSource(SourceConfig(name="chats", kind="chat", paths=[str(p) for p in sorted(out.glob("*.tar"))]))
    records = [source.open(i).get(j) for i in range(len(source.shards)) for j in range(len(source.open(i)))]
    by_id = {r.meta["id"]: r for r in records}
    assert by_id["two"].images == [(root / "a.jpg").read_bytes(), (root / "b.png").read_bytes()]
    assert by_id["one"].images == [(root / "a.jpg").read_bytes()] and by_id["text"].images == []


def test_build_from_parquet_via_cli(tmp_path, capsys):
    import datasets
    rows = {"image": [{"bytes": photo_bytes(n), "path": None} for n in PHOTOS[:3]] + [{"bytes": photo_bytes("camera"), "path": None}],
            "caption": ["an astronaut", "coffee cup", "a cat", ""], "score": [0.9, 0.8, 0.7, 0.1]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "score": datasets.Value("float32")}))
    parquet = tmp_path / "data" / "train-00000.parquet"
    parquet.parent.mkdir()
    ds.to_parquet(str(parquet))
    out = tmp_path / "shards"
    rc = evip_main(["data", "build", str(parquet.parent), "--out", str(out), "--text-column", "caption",
                    "--samples-per-shard", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "4 inputs: 3 caption samples in 2 shards" in printed and "skipped 1 missing_caption" in printed
    assert "shard-000000.tar: 2 samples" in printed                             # per-shard counts and sizes
    manifest = check_manifest(out, 3)
    assert manifest["format"] == "hf"
    samples = read_shards(out)
    assert [s["txt"].decode() for s in samples] == ["an astronaut", "coffee cup", "a cat"]
    assert samples[1]["jpg"] == photo_bytes("coffee")
    meta = json.loads(samples[0]["json"])
    assert meta["row"] == 0 and meta["score"] == pytest.approx(0.9)
    from evip.data.build import BuildError
    with pytest.raises(BuildError, match="column 'text' not in"):
        build_shards(BuildConfig(input=str(parquet), out=str(tmp_path / "x"), progress=False))


def test_build_cli_reports_every_skip_and_why_nothing_was_written(tmp_path, capsys):
    only_svg = tmp_path / "svgs"
    only_svg.mkdir()
    for i in range(3):
        (only_svg / f"art{i}.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
        (only_svg / f"art{i}.txt").write_text(f"clip art {i}")
    rc = evip_main(["data", "build", str(only_svg), "--out", str(tmp_path / "o"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "skipped 3 unsupported_format" in captured.out and "skipped 3 caption_without_picture" in captured.out
    assert "wrote no samples: all 6 inputs were skipped: 3 unsupported_format" in captured.err
    # a missing input, an unreadable one: one line, no traceback
    rc = evip_main(["data", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "build input not found" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe not utf-8\n")
    rc = evip_main(["data", "build", str(bad), "--out", str(tmp_path / "o3"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot read" in err


def test_caption_rules_and_long_caption_warning(tmp_path, capsys):
    from evip.data.build_inputs import caption_text
    raw = "\n\n  Red fox  \n in snow\n\nRenard roux\ndans la neige\n"
    assert caption_text(raw, "whole") == "Red fox  \n in snow\n\nRenard roux\ndans la neige"
    assert caption_text(raw, "first_line") == "Red fox"
    assert caption_text(raw, "first_paragraph") == "Red fox in snow"
    root = tmp_path / "pics"
    root.mkdir()
    for i, name in enumerate(PHOTOS):
        (root / f"{name}.jpg").write_bytes(photo_bytes(name))
        body = "\n".join(f"line {k} of a long multilingual description" for k in range(60)) if i < 2 else "short"
        (root / f"{name}.txt").write_text(f"{name} first line\n{body}\n")
    rc = evip_main(["data", "build", str(root), "--out", str(tmp_path / "whole"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0 and "warning: 2 of 5 captions are longer than 2000 characters" in err
    assert "shorter than" not in err
    (root / f"{PHOTOS[4]}.txt").write_text("\n\nfox\n")                      # 3 characters
    rc = evip_main(["data", "build", str(root), "--out", str(tmp_path / "short"), "--no-progress"])
    assert rc == 0 and "warning: 1 of 5 captions are shorter than 5 characters" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "short" / "manifest.json").read_text())
    assert manifest["captions"]["under_min_chars"] == 1 and manifest["captions"]["over_max_chars"] == 2
    (root / f"{PHOTOS[4]}.txt").write_text(f"{PHOTOS[4]} first line\nshort\n")
    rc = evip_main(["data", "build", str(root), "--out", str(tmp_path / "first"), "--caption", "first_line",
                    "--no-progress"])
    assert rc == 0 and "warning" not in capsys.readouterr().err
    texts = sorted(s["txt"].decode() for s in read_shards(tmp_path / "first"))
    assert texts == sorted(f"{n} first line" for n in PHOTOS)


def test_heldout_split_and_ready_recipes(tmp_path, capsys):
    from evip.data.recipe import load_recipe
    root = tmp_path / "pics"
    root.mkdir()
    for i in range(20):
        name = PHOTOS[i % len(PHOTOS)]
        (root / f"p{i:02d}.png").write_bytes(photo_bytes(name, "PNG", (32, 24)))
        if i != 3:                                        # p03 has no caption: its turn passes on
            (root / f"p{i:02d}.txt").write_text(f"picture {i}")
    out = tmp_path / "out"
    rc = evip_main(["data", "build", str(root), "--out", str(out), "--heldout", "4", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "15 caption samples" in printed and "4 held out" in printed
    assert f"data.recipe={out}/recipe.yaml" in printed and f"eval.heldout_data.recipe={out}/heldout.yaml" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 15 and manifest["heldout"]["count"] == 4
    report = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    held = [r["input"] for r in report if r["status"] == "heldout"]
    assert held == ["p04.png", "p09.png", "p14.png", "p19.png"]          # spread evenly, p03's turn to p04
    # the recipes are ready, from any working directory: paths relative to the recipe file
    train, heldout = load_recipe(out / "recipe.yaml"), load_recipe(out / "heldout.yaml")
    from evip.data.shards import expand_paths
    assert len(expand_paths(train.sources[0].paths)) == 1 and heldout.sources[0].paths[0] == f"{out}/heldout-*.tar"
    held_txt = {s["txt"].decode() for s in wds.WebDataset(expand_paths(heldout.sources[0].paths),
                                                           shardshuffle=False, empty_check=False)}
    assert held_txt == {"picture 4", "picture 9", "picture 14", "picture 19"}
    # a fraction gives the same split
    rc = evip_main(["data", "build", str(root), "--out", str(tmp_path / "f"), "--heldout", "0.2", "--no-progress"])
    assert rc == 0 and json.loads((tmp_path / "f" / "manifest.json").read_text())["heldout"]["count"] == 4
