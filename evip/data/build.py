"""`evip data build`: a folder, a jsonl or an HF dataset -> webdataset tar shards, a manifest, a
per-input report and a ready recipe for each split.

Shard layout (img2dataset): members `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`, written by
`webdataset.TarWriter` (mtime 0, so the same input gives byte-identical shards). A sample with
several images stores them as `{key}.0.jpg`, `{key}.1.png`, ... in prompt order. Chats store
their `conversations` (and the other jsonl fields) in `{key}.json`; captions store the caption
in `{key}.txt` and provenance in `{key}.json`. Image bytes are copied as they are (JPEG, PNG,
WebP); other formats Pillow reads (GIF, BMP, TIFF) are re-encoded to PNG. Every image is fully
decoded once here, so a truncated or corrupt file is reported now, not met during training.
Keys are 9-digit sample numbers, per split.

Inputs (folder, jsonl, hf) and the caption rules of folder captions: evip/data/build_inputs.py.
Captions longer than `max_caption_chars` (default 2000) or shorter than `min_caption_chars`
(default 5), the `filters.max/min_caption_chars` of the shipped S1 recipes, are kept but counted
and warned about: a recipe filter would drop them.

Held-out split: `heldout` = N (a count, >= 1) or a fraction in (0, 1). Held-out samples are
spread evenly over the input order (sample i of the T inputs goes to the held-out split when
floor((i + 1) * N / T) passes the count so far; a skipped input hands its turn to the next good
one), so the same input gives the same split. They are written as `heldout-*.tar`.

Outputs in `out`: shards, `manifest.json` {"input", "format", "kind", "shards": [{"path", "count",
"bytes", "sha256"}], "count", "bytes", "skipped": {reason: n}, "heldout": {"count", "shards"},
"captions": {...}}, `report.jsonl` (one line per input: {"input", "status": train | heldout |
skipped, "reason", "key"}), and the recipes `recipe.yaml` (train) and `heldout.yaml`, whose shard
paths are relative to themselves: `data.recipe=OUT/recipe.yaml`,
`eval.heldout_data.recipe=OUT/heldout.yaml`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from evip.data.build_inputs import (CAPTION_RULES, REASONS, BuildError, Skip, detect_format,
                                    folder_samples, hf_samples, jsonl_samples)

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class BuildConfig:
    input: str                              # folder, .jsonl file, or HF dataset (dir / parquet / arrow)
    out: str                                # output directory for shards + manifest.json
    format: str = "auto"                    # auto | folder | jsonl | hf
    root: str = ""                          # jsonl: directory the image paths are relative to
    image_column: str = "image"             # hf
    text_column: str = "text"               # hf caption column
    conversations_column: str = ""          # hf: set for chat data
    caption: str = "whole"                  # folder captions: whole | first_line | first_paragraph
    max_caption_chars: int = 2000           # warn (with counts) about longer captions; 0: off
    min_caption_chars: int = 5              # warn (with counts) about shorter captions; 0: off
    heldout: float = 0                      # N >= 1 samples, or a fraction in (0, 1); 0: none
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
    heldout: list[ShardInfo] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)   # reason -> first inputs skipped
    kind: str = "caption"
    inputs: int = 0
    long_captions: int = 0
    short_captions: int = 0
    longest_caption: int = 0
    recipes: dict[str, str] = field(default_factory=dict)           # split -> recipe path

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def heldout_count(self) -> int:
        return sum(s.count for s in self.heldout)

    def why_empty(self) -> str:
        """One sentence: why nothing was written."""
        if not self.inputs:
            return "the input holds no files"
        parts = [f"{n} {r} ({REASONS.get(r, r)}; e.g. {', '.join(self.examples.get(r, [])[:3])})"
                 for r, n in sorted(self.skipped.items(), key=lambda kv: -kv[1])]
        return f"all {self.inputs} inputs were skipped: " + "; ".join(parts)


def image_member(data: bytes) -> tuple[str, bytes]:
    """(extension, bytes) for a shard member, after a full decode; unknown formats re-encoded to PNG."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except Exception:
        raise Skip("bad_image") from None
    if fmt in KEEP_FORMATS:
        return KEEP_FORMATS[fmt], data
    try:
        buf = io.BytesIO()
        (img if img.mode in ("RGB", "RGBA", "L", "LA", "P", "I;16", "I") else img.convert("RGB")).save(buf, "PNG")
        return "png", buf.getvalue()
    except Exception:
        raise Skip("bad_image") from None


def heldout_target(heldout: float, total: int) -> int:
    """How many held-out samples `heldout` (N >= 1, or a fraction in (0, 1)) asks for of `total`."""
    if heldout < 0 or (heldout >= 1 and heldout != int(heldout)):
        raise BuildError(f"--heldout {heldout}: a count N >= 1 or a fraction in (0, 1)")
    n = int(heldout) if heldout >= 1 else int(round(heldout * total))
    if heldout and n >= total:
        raise BuildError(f"--heldout {heldout:g} asks for {n} held-out samples of {total} inputs: "
                         "leave some for training")
    return n


# ---- writing -------------------------------------------------------------------------------
class ShardSink:
    """Rotating webdataset.TarWriter: a new shard every `samples_per_shard` samples or
    `max_shard_bytes` bytes; records count, size and sha256 of each closed shard."""

    def __init__(self, out: Path, prefix: str, samples_per_shard: int, max_bytes: int, on_close=None):
        self.out, self.prefix = out, prefix
        self.samples_per_shard, self.max_bytes = samples_per_shard, max_bytes
        self.shards: list[ShardInfo] = []
        self.on_close = on_close
        self.written = 0
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
        self.written += 1

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


def write_recipe(path: Path, name: str, kind: str, prefix: str, count: int, src: Path) -> None:
    """A ready one-source recipe over `prefix-*.tar` beside it (paths relative to the recipe)."""
    path.write_text(
        f"# Written by `evip data build {src}`: {count} {kind} samples. Shard paths are relative to\n"
        f"# this file. Add `filters:` to the source to drop samples (evip/data/filters.py).\n"
        f"name: {name}\n"
        f"sources:\n"
        f"  - name: {name}\n"
        f"    kind: {kind}\n"
        f"    format: webdataset\n"
        f"    weight: 1.0\n"
        f"    paths: [\"{prefix}-*.tar\"]\n")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def build_shards(cfg: BuildConfig, log=print) -> BuildResult:
    """Convert `cfg.input` into shards under `cfg.out`; write manifest.json, report.jsonl and the
    recipes there. Raises BuildError (one line) when the input as a whole is unusable."""
    from tqdm import tqdm

    src, out = Path(cfg.input), Path(cfg.out)
    if not src.exists():
        raise BuildError(f"build input not found: {src}")
    if not os.access(src, os.R_OK):
        raise BuildError(f"build input not readable: {src} (check its permissions)")
    if cfg.caption not in CAPTION_RULES:
        raise BuildError(f"--caption {cfg.caption!r}: one of {', '.join(CAPTION_RULES)}")
    fmt = detect_format(src) if cfg.format == "auto" else cfg.format
    try:
        if fmt == "folder":
            if not src.is_dir():
                raise BuildError(f"--format folder needs a directory, got the file {src}")
            (total, samples), kind = folder_samples(src, cfg.caption), "caption"
        elif fmt == "jsonl":
            (total, samples), kind = jsonl_samples(src, Path(cfg.root) if cfg.root else src.parent), "chat"
        elif fmt == "hf":
            (total, samples), kind = hf_samples(src, cfg), "chat" if cfg.conversations_column else "caption"
        else:
            raise BuildError(f"--format {fmt!r}: one of auto, folder, jsonl, hf")
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read {src}: {getattr(e, 'strerror', None) or e}") from None
    n_heldout = heldout_target(cfg.heldout, total)
    out.mkdir(parents=True, exist_ok=True)
    result = BuildResult(kind=kind, inputs=total)
    shard_log = lambda s: log(f"  {s.path}: {s.count} samples, {s.bytes / 1e6:.1f} MB")  # noqa: E731
    train = ShardSink(out, cfg.prefix, cfg.samples_per_shard, cfg.max_shard_bytes, on_close=shard_log)
    held = ShardSink(out, "heldout", cfg.samples_per_shard, cfg.max_shard_bytes, on_close=shard_log)
    bar = tqdm(samples, desc=f"build {src.name}", unit="input", total=total, disable=not cfg.progress)
    seen = 0                                      # inputs met so far (samples and skips)
    with open(out / "report.jsonl", "w", encoding="utf-8") as report:
        for item in bar:
            origin = item.origin if isinstance(item, Skip) else item[3]
            seen += 1
            try:
                if isinstance(item, Skip):
                    raise item
                images, text, meta, _ = item
                members = [image_member(data) for data in images]
            except Skip as e:
                result.skipped[e.reason] = result.skipped.get(e.reason, 0) + 1
                result.examples.setdefault(e.reason, [])
                if len(result.examples[e.reason]) < 5:
                    result.examples[e.reason].append(origin)
                report.write(json.dumps({"input": origin, "status": "skipped", "reason": e.reason,
                                         **({"detail": e.detail} if e.detail else {})}, ensure_ascii=False) + "\n")
                bar.set_postfix(skipped=sum(result.skipped.values()))
                continue
            due = (seen * n_heldout) // total if total else 0
            sink = held if held.written < due else train
            key = f"{sink.written:09d}"
            sample = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode()}
            if text is not None:
                sample["txt"] = text.encode()
                result.longest_caption = max(result.longest_caption, len(text))
                if cfg.max_caption_chars and len(text) > cfg.max_caption_chars:
                    result.long_captions += 1
                if len(text) < cfg.min_caption_chars:
                    result.short_captions += 1
            for i, (ext, data) in enumerate(members):
                sample[ext if len(members) == 1 else f"{i}.{ext}"] = data
            sink.write(sample)
            report.write(json.dumps({"input": origin, "status": "heldout" if sink is held else "train",
                                     "key": key}, ensure_ascii=False) + "\n")
    bar.close()
    train.close()
    held.close()
    result.shards, result.heldout = train.shards, held.shards
    if result.count:
        write_recipe(out / "recipe.yaml", out.name or "data", kind, cfg.prefix, result.count, src)
        result.recipes["train"] = str(out / "recipe.yaml")
    if result.heldout_count:
        write_recipe(out / "heldout.yaml", f"{out.name or 'data'}_heldout", kind, "heldout",
                     result.heldout_count, src)
        result.recipes["heldout"] = str(out / "heldout.yaml")
    manifest = {"input": str(src), "format": fmt, "kind": kind, "inputs": total, "count": result.count,
                "bytes": sum(s.bytes for s in result.shards), "skipped": result.skipped,
                "shards": [vars(s) for s in result.shards],
                "heldout": {"count": result.heldout_count, "shards": [vars(s) for s in result.heldout]},
                "captions": {"rule": cfg.caption, "longest_chars": result.longest_caption,
                             "over_max_chars": result.long_captions, "max_chars": cfg.max_caption_chars,
                             "under_min_chars": result.short_captions, "min_chars": cfg.min_caption_chars},
                "recipes": {k: Path(v).name for k, v in result.recipes.items()}}
    _write_json(out / "manifest.json", manifest)
    return result
