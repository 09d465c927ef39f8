"""The inputs of `evip data build` (evip/data/build.py): a folder of picture + caption files, an
InternVL/LLaVA jsonl, or an HF dataset, each read as a count of inputs and an iterator of items,
one per input: a sample `(images, txt or None, json, origin)` or a `Skip` with its reason. The
build decodes the images, writes the shards and counts the skips.

Inputs:
- folder: every file under it (recursively, sorted) is accounted for. A picture
  (`x.jpg|jpeg|png|webp|gif|bmp|tif|tiff`) is used with its caption `x.txt` beside it. Skipped,
  each with its reason: `unsupported_format` (SVG, PDF, anything else: convert it to PNG),
  `caption_without_picture` (x.txt with no usable picture x.*), `missing_caption` (a picture
  without x.txt), `empty_caption`, `unreadable_caption` (not UTF-8), `bad_image` (Pillow cannot
  decode it), `hidden` (names starting with a dot).
- jsonl: InternVL/LLaVA lines {"id", "image": path | [paths] (relative to `root`), "conversations"};
  lines without an image are text-only chats;
- hf: a `save_to_disk` directory or parquet/arrow files; `image_column` (datasets Image feature,
  raw bytes or a path) and `text_column` (caption) or `conversations_column` (chat).

Caption files (folder input), `caption`:
- `whole` (default): the whole file, surrounding whitespace stripped, inner line breaks kept;
- `first_line`: the first non-empty line;
- `first_paragraph`: the first block of non-empty lines (up to the first blank line), its lines
  joined by single spaces.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from evip.data.build import BuildConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_RULES = ("whole", "first_line", "first_paragraph")
REASONS = {
    "unsupported_format": "not a picture format the build reads (convert it to PNG or JPEG)",
    "caption_without_picture": "a caption file with no usable picture of the same name",
    "missing_caption": "a picture without a caption file of the same name (x.txt)",
    "empty_caption": "the caption file is empty (under the caption rule)",
    "unreadable_caption": "the caption file is not UTF-8 text",
    "bad_image": "Pillow cannot decode the picture",
    "missing_image": "an image file named by the input does not exist",
    "missing_conversations": "no conversations",
    "bad_json": "a line that is not JSON",
    "hidden": "a hidden file (name starts with a dot)",
}


class Skip(Exception):
    """This input cannot be converted; `reason` is counted in the manifest, `origin` names it."""

    def __init__(self, reason: str, origin: str = "", detail: str = ""):
        super().__init__(reason)
        self.reason, self.origin, self.detail = reason, origin, detail


class BuildError(ValueError):
    """The input as a whole is unusable (missing, unreadable, wrong format); one line, no traceback."""


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
    raise BuildError(f"cannot tell the format of {path} (a folder, a .jsonl, or parquet/arrow): "
                     "pass --format folder|jsonl|hf")


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise Skip("missing_image", str(path)) from None


def caption_text(raw: str, rule: str) -> str:
    """The caption of a caption file under `rule` (see the module doc)."""
    lines = [line.strip() for line in raw.strip().splitlines()]
    if rule == "whole":
        return raw.strip()
    if rule == "first_line":
        return next((line for line in lines if line), "")
    if rule == "first_paragraph":
        para: list[str] = []
        for line in lines:
            if line:
                para.append(line)
            elif para:
                break
        return " ".join(para)
    raise BuildError(f"--caption {rule!r}: one of {', '.join(CAPTION_RULES)}")


# ---- the three readers: (number of inputs, iterator of (images, txt or None, json, origin) or Skip) --
Item = "tuple[list[bytes], str | None, dict, str] | Skip"


def folder_samples(root: Path, rule: str = "whole") -> tuple[int, Iterator[Item]]:
    """Every file under `root` becomes one item: a sample (a picture and its caption) or a Skip
    (a caption file is consumed by its picture and yields nothing of its own when used)."""
    try:
        files = sorted(p for p in root.rglob("*") if p.is_file())
    except OSError as e:
        raise BuildError(f"cannot read the folder {root}: {e.strerror or e}") from None
    by_stem: dict[Path, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.with_suffix(""), []).append(p)
    def hidden(p: Path) -> bool:
        return any(part.startswith(".") for part in p.relative_to(root).parts)

    def has_picture(p: Path) -> bool:
        return any(s.suffix.lower() in IMAGE_SUFFIXES and not hidden(s) for s in by_stem[p.with_suffix("")])

    # one item per file, except the caption files their pictures consume
    total = sum(1 for p in files if hidden(p) or p.suffix.lower() != ".txt" or not has_picture(p))

    def items() -> Iterator[Item]:
        for p in files:
            rel = str(p.relative_to(root))
            suffix = p.suffix.lower()
            siblings = by_stem[p.with_suffix("")]
            if hidden(p):
                yield Skip("hidden", rel)
            elif suffix == ".txt":
                if not has_picture(p):
                    others = [s.name for s in siblings if s != p]
                    yield Skip("caption_without_picture", rel,
                               f"its picture {others[0]} is an unsupported format" if others else "")
            elif suffix not in IMAGE_SUFFIXES:
                yield Skip("unsupported_format", rel, suffix or "(no suffix)")
            else:
                cap = p.with_suffix(".txt")
                if not cap.is_file():
                    cap = next((s for s in siblings if s.suffix.lower() == ".txt"), cap)
                if not cap.is_file():
                    yield Skip("missing_caption", rel)
                    continue
                try:
                    text = caption_text(cap.read_bytes().decode("utf-8-sig"), rule)
                except UnicodeDecodeError:
                    yield Skip("unreadable_caption", rel, str(cap.relative_to(root)))
                    continue
                if not text:
                    yield Skip("empty_caption", rel)
                    continue
                try:
                    blob = p.read_bytes()
                except OSError:
                    yield Skip("bad_image", rel, "unreadable file")
                    continue
                yield [blob], text, {"source_path": rel}, rel
    return total, items()


def jsonl_samples(path: Path, root: Path) -> tuple[int, Iterator[Item]]:
    with open(path, encoding="utf-8") as fh:
        total = sum(1 for line in fh if line.strip())

    def items() -> Iterator[Item]:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh):
                if not line.strip():
                    continue
                origin = f"{path.name}:{n + 1}"
                try:
                    obj = json.loads(line)
                    images = obj.get("image") or []
                    images = [images] if isinstance(images, str) else list(images)
                    if not obj.get("conversations"):
                        raise Skip("missing_conversations")
                    blobs = [read_file(root / p) for p in images]
                except Skip as e:
                    yield Skip(e.reason, origin, e.origin)
                    continue
                except (ValueError, AttributeError):
                    yield Skip("bad_json", origin)
                    continue
                meta = {k: v for k, v in obj.items() if k != "image"}
                meta.update(line=n, image_paths=images)
                yield blobs, None, meta, origin
    return total, items()


def hf_samples(path: Path, cfg: BuildConfig) -> tuple[int, Iterator[Item]]:
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
            raise BuildError(f"column {col!r} not in {path} (columns: {ds.column_names}): "
                             "pass --image-column / --text-column / --conversations-column")
    if isinstance(ds.features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))

    def items() -> Iterator[Item]:
        for n, row in enumerate(ds):
            origin = f"row {n}"
            try:
                images = [_hf_image(v, path) for v in _as_list(row.get(cfg.image_column))]
                meta = {k: v for k, v in row.items() if k not in (cfg.image_column, cfg.text_column)
                        and _jsonable(v)}
                meta["row"] = n
                if cfg.conversations_column:
                    if not row.get(cfg.conversations_column):
                        raise Skip("missing_conversations")
                    meta["conversations"] = meta.pop(cfg.conversations_column)
                    yield images, None, meta, origin
                else:
                    text = row.get(cfg.text_column)
                    if not isinstance(text, str) or not text.strip():
                        raise Skip("missing_caption")
                    if not images:
                        raise Skip("missing_image")
                    yield images, text.strip(), meta, origin
            except Skip as e:
                yield Skip(e.reason, origin, e.origin)
    return len(ds), items()


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
