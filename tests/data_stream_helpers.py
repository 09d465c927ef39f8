"""Tiny data for the stream/loader tests: img2dataset-style tar shards, jsonl, parquet, recipes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import yaml
from PIL import Image


def png_bytes(i: int, size=(24, 16)) -> bytes:
    img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, keys: list[str], members=None) -> Path:
    """A webdataset shard: per key an image, a caption `caption <key>` and a json."""
    with tarfile.open(path, "w") as tf:
        for k in keys:
            for ext, data in (members(k) if members else default_members(k)):
                _add(tf, f"{k}.{ext}", data)
    return path


def default_members(k: str):
    i = int(k.rsplit("_", 1)[-1])
    return [("png", png_bytes(i)), ("txt", f"caption {k}".encode()),
            ("json", json.dumps({"key": k}).encode())]


def make_shards(root: Path, prefix: str, n_shards: int, per_shard: int) -> list[str]:
    """Shards {prefix}-00000.tar ... with keys {prefix}_{global index}; returns all keys."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        ks = [f"{prefix}_{s * per_shard + j:05d}" for j in range(per_shard)]
        write_shard(root / f"{prefix}-{s:05d}.tar", ks)
        keys += ks
    return keys


def write_recipe(path: Path, sources: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"name": path.stem, "sources": sources}))
    return path
