"""`evip data build`: a folder, a jsonl or an HF dataset -> webdataset tar shards + manifest.json.

Shard layout (img2dataset): members `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`, written by
`webdataset.TarWriter` (mtime 0, so the same input gives byte-identical shards). A sample with
several images stores them as `{key}.0.jpg`, `{key}.1.png`, ... in prompt order. Chats store
their `conversations` (and the other jsonl fields) in `{key}.json`; captions store the caption
in `{key}.txt` and provenance in `{key}.json`. Image bytes are copied as they are (JPEG, PNG,
WebP); other formats (GIF, BMP, TIFF...) are re-encoded to PNG. Keys are 9-digit sample numbers.

Inputs:
- folder: every `x.jpg|jpeg|png|webp` (recursively, sorted) with its caption in `x.txt`;
- jsonl: InternVL/LLaVA lines {"id", "image": path | [paths] (relative to `root`), "conversations"};
  lines without an image are text-only chats;
- hf: a `save_to_disk` directory or parquet/arrow files; `image_column` (datasets Image feature,
  raw bytes or a path) and `text_column` (caption) or `conversations_column` (chat).
A sample that cannot be converted (missing caption or image, unreadable image) is skipped and
counted per reason in the manifest; it never stops the build.

manifest.json: {"input", "format", "kind", "shards": [{"path", "count", "bytes", "sha256"}],
"count", "bytes", "skipped": {reason: n}}.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class Skip(Exception):
    """This input sample cannot be converted; `reason` is counted in the manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class BuildConfig:
    input: str                              # folder, .jsonl file, or HF dataset (dir / parquet / arrow)
    out: str                                # output directory for shards + manifest.json
    format: str = "auto"                    # auto | folder | jsonl | hf
    root: str = ""                          # jsonl: directory the image paths are relative to
    image_column: str = "image"             # hf
    text_column: str = "text"               # hf caption column
    conversations_column: str = ""          # hf: set for chat data
    samples_per_shard: int = 10_000
    max_shard_bytes: int = 1 << 30
    prefix: str = "shard"
    progress: bool = True


@dataclass
class ShardInfo:
    path: str
    count: int = 0
    bytes: int = 0
    sha256: str = ""


@dataclass
class BuildResult:
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    kind: str = "caption"

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".jsonl":
        return "jsonl"
    if path.is_file() and path.suffix in (".parquet", ".arrow"):
        return "hf"
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() \
                or any(path.glob("*.parquet")) or any(path.glob("**/*.parquet")):
            return "hf"
        return "folder"
    raise ValueError(f"cannot tell the format of {path}: pass --format folder|jsonl|hf")


def image_member(data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) for a shard member; unknown formats re-encoded to PNG."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
    except Exception:
        raise Skip("bad_image") from None
    if fmt in KEEP_FORMATS:
        return KEEP_FORMATS[fmt], data
    try:
        img.load()
        buf = io.BytesIO()
        (img if img.mode in ("RGB", "RGBA", "L", "LA", "P") else img.convert("RGB")).save(buf, "PNG")
        return "png", buf.getvalue()
    except Exception:
        raise Skip("bad_image") from None


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise Skip("missing_image") from None


# ---- the three readers: each yields (images, txt or None, json dict) or a Skip ------------
Item = "tuple[list[bytes], str | None, dict] | Skip"


def folder_samples(root: Path) -> Iterator[Item]:
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        cap = img.with_suffix(".txt")
        if not cap.is_file() or not cap.read_text(encoding="utf-8", errors="replace").strip():
            yield Skip("missing_caption")
            continue
        yield [read_file(img)], cap.read_text(encoding="utf-8", errors="replace").strip(), \
            {"source_path": str(img.relative_to(root))}


def jsonl_samples(path: Path, root: Path) -> Iterator[Item]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                images = obj.get("image") or []
                images = [images] if isinstance(images, str) else list(images)
                if not obj.get("conversations"):
                    raise Skip("missing_conversations")
                blobs = [read_file(root / p) for p in images]
            except Skip as e:
                yield e
                continue
            except ValueError:
                yield Skip("bad_json")
                continue
            meta = {k: v for k, v in obj.items() if k != "image"}
            meta.update(line=n, image_paths=images)
            yield blobs, None, meta


def hf_samples(path: Path, cfg: BuildConfig) -> Iterator[Item]:
    import datasets
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
    else:
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("**/*.parquet"))
        ds = datasets.load_dataset("parquet" if files[0].endswith(".parquet") else "arrow",
                                   data_files=files, split="train")
    for col in [cfg.image_column, cfg.conversations_column or cfg.text_column]:
        if col and col not in ds.column_names:
            raise ValueError(f"column {col!r} not in {path} (columns: {ds.column_names}): "
                             "pass --image-column / --text-column / --conversations-column")
    if isinstance(ds.features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    for n, row in enumerate(ds):
        try:
            images = [_hf_image(v, path) for v in _as_list(row.get(cfg.image_column))]
            meta = {k: v for k, v in row.items() if k not in (cfg.image_column, cfg.text_column)
                    and _jsonable(v)}
            meta["row"] = n
            if cfg.conversations_column:
                if not row.get(cfg.conversations_column):
                    raise Skip("missing_conversations")
                meta["conversations"] = meta.pop(cfg.conversations_column)
                yield images, None, meta
            else:
                text = row.get(cfg.text_column)
                if not isinstance(text, str) or not text.strip():
                    raise Skip("missing_caption")
                if not images:
                    raise Skip("missing_image")
                yield images, text.strip(), meta
        except Skip as e:
            yield e


def _as_list(v) -> list:
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _hf_image(v, base: Path) -> bytes:
    if isinstance(v, dict):
        if v.get("bytes"):
            return v["bytes"]
        v = v.get("path")
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, str) and v:
        p = Path(v)
        return read_file(p if p.is_absolute() else (base if base.is_dir() else base.parent) / p)
    raise Skip("missing_image")


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# ---- writing -------------------------------------------------------------------------------
class ShardSink:
    """Rotating webdataset.TarWriter: a new shard every `samples_per_shard` samples or
    `max_shard_bytes` bytes; records count, size and sha256 of each closed shard."""

    def __init__(self, out: Path, prefix: str, samples_per_shard: int, max_bytes: int, on_close=None):
        self.out, self.prefix = out, prefix
        self.samples_per_shard, self.max_bytes = samples_per_shard, max_bytes
        self.shards: list[ShardInfo] = []
        self.on_close = on_close
        self._writer = None
        self._bytes = 0

    def write(self, sample: dict[str, bytes]) -> None:
        import webdataset as wds
        cur = self.shards[-1] if self.shards else None
        if self._writer is None or cur.count >= self.samples_per_shard or self._bytes >= self.max_bytes:
            self.close()
            info = ShardInfo(path=f"{self.prefix}-{len(self.shards):06d}.tar")
            self.shards.append(info)
            self._writer = wds.TarWriter(str(self.out / info.path), encoder=False, mtime=0.0)
            self._bytes = 0
        self._bytes += self._writer.write(sample)
        self.shards[-1].count += 1

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        info = self.shards[-1]
        path = self.out / info.path
        info.bytes = path.stat().st_size
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        info.sha256 = h.hexdigest()
        if self.on_close:
            self.on_close(info)


def build_shards(cfg: BuildConfig, log=print) -> BuildResult:
    """Convert `cfg.input` into shards under `cfg.out` and write `manifest.json` there."""
    from tqdm import tqdm

    src, out = Path(cfg.input), Path(cfg.out)
    if not src.exists():
        raise FileNotFoundError(f"build input not found: {src}")
    fmt = detect_format(src) if cfg.format == "auto" else cfg.format
    if fmt == "folder":
        samples, kind = folder_samples(src), "caption"
    elif fmt == "jsonl":
        samples, kind = jsonl_samples(src, Path(cfg.root) if cfg.root else src.parent), "chat"
    elif fmt == "hf":
        samples, kind = hf_samples(src, cfg), "chat" if cfg.conversations_column else "caption"
    else:
        raise ValueError(f"--format {fmt!r}: one of auto, folder, jsonl, hf")
    out.mkdir(parents=True, exist_ok=True)
    result = BuildResult(kind=kind)
    sink = ShardSink(out, cfg.prefix, cfg.samples_per_shard, cfg.max_shard_bytes,
                     on_close=lambda s: log(f"  {s.path}: {s.count} samples, {s.bytes / 1e6:.1f} MB"))
    bar = tqdm(samples, desc=f"build {src.name}", unit="sample", disable=not cfg.progress)
    written = 0
    for item in bar:
        try:
            if isinstance(item, Skip):
                raise item
            images, text, meta = item
            members = [image_member(data) for data in images]
        except Skip as e:
            result.skipped[e.reason] = result.skipped.get(e.reason, 0) + 1
            bar.set_postfix(skipped=sum(result.skipped.values()))
            continue
        key = f"{written:09d}"
        written += 1
        sample = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode()}
        if text is not None:
            sample["txt"] = text.encode()
        for i, (ext, data) in enumerate(members):
            sample[ext if len(members) == 1 else f"{i}.{ext}"] = data
        sink.write(sample)
    bar.close()
    sink.close()
    result.shards = sink.shards
    manifest = {"input": str(src), "format": fmt, "kind": kind, "count": result.count,
                "bytes": sum(s.bytes for s in result.shards), "skipped": result.skipped,
                "shards": [vars(s) for s in result.shards]}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return result
