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
    Image.fromarray(__import__("numpy").zeros((8, 8, 3), "uint8")).save(root / "odd.bmp")   # ignored suffix
    return root


def test_build_from_folder(folder, tmp_path):
    out = tmp_path / "shards"
    result = build_shards(BuildConfig(input=str(folder), out=str(out), samples_per_shard=2, progress=False))
    assert result.kind == "caption" and result.skipped == {"missing_caption": 1, "bad_image": 1}
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
    assert "wrote 3 caption samples in 2 shards" in printed and "missing_caption: 1" in printed
    assert "shard-000000.tar: 2 samples" in printed                             # per-shard counts and sizes
    manifest = check_manifest(out, 3)
    assert manifest["format"] == "hf"
    samples = read_shards(out)
    assert [s["txt"].decode() for s in samples] == ["an astronaut", "coffee cup", "a cat"]
    assert samples[1]["jpg"] == photo_bytes("coffee")
    meta = json.loads(samples[0]["json"])
    assert meta["row"] == 0 and meta["score"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="column 'text' not in"):
        build_shards(BuildConfig(input=str(parquet), out=str(tmp_path / "x"), progress=False))
