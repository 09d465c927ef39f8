"""Sources: a recipe entry turned into a fixed list of shards that yield `Record`s by index.

Every source exposes the same small interface, which is all the stream needs:

    source.shards            list of shard names (fixed, identical on every rank)
    source.open(i)           -> reader with .random_access, len() (random-access readers only),
                                .get(j) -> Record (raises BadSample, or IndexError past the end),
                                .truncated (non-empty when the shard breaks), .close()

Formats: webdataset tars (img2dataset layout, or chat shards whose `json` holds `conversations`),
InternVL/LLaVA jsonl (one virtual shard per `rows_per_shard` lines of a file), and HF datasets
stored locally (parquet files read by row group, arrow files / `save_to_disk` directories
memory-mapped by `datasets`; one virtual shard per `rows_per_shard` rows), or any dataset
`datasets.load_dataset(..., streaming=True)` opens (`streaming: true`; one shard per file).
"""
from __future__ import annotations

import io
import json
import os
from bisect import bisect_right

import numpy as np

from evip.data.record import BadSample, Record
from evip.data.recipe import SourceConfig
from evip.data.shards import expand_paths, open_tar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def images_in_order(members: dict[str, bytes]) -> list[bytes]:
    """A sample's images: `{key}.jpg` (one image, img2dataset) or `{key}.0.jpg`, `{key}.1.png`, ...
    (several, in prompt order, as `evip data build` writes them)."""
    single = [members[e] for e in IMAGE_EXTS if e in members]
    numbered = []
    for ext, data in members.items():
        index, _, fmt = ext.partition(".")
        if index.isdigit() and fmt in IMAGE_EXTS:
            numbered.append((int(index), data))
    return single + [data for _, data in sorted(numbered, key=lambda item: item[0])]


class TarSource:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.shards = expand_paths(cfg.paths)

    def open(self, i: int) -> "TarReader":
        return TarReader(self.cfg, self.shards[i])


class TarReader:
    def __init__(self, cfg: SourceConfig, path: str):
        self.cfg, self.path = cfg, path
        self.tar = open_tar(path)
        self.random_access = self.tar.random_access

    @property
    def truncated(self) -> str:
        return self.tar.truncated

    def __len__(self) -> int:
        return len(self.tar)

    def get(self, j: int) -> Record:
        key, m = self.tar.read(j)
        name = f"{os.path.basename(self.path)}/{key}"
        meta: dict = {}
        if "json" in m:
            try:
                meta = json.loads(m["json"])
            except ValueError as e:
                raise BadSample("missing_field", f"{name}: json does not parse: {e}") from None
        images = images_in_order(m)
        text = m["txt"].decode("utf-8", errors="replace") if "txt" in m else None
        conversations = meta.get("conversations") if isinstance(meta, dict) else None
        return Record(key=name, source=self.cfg.name, shard=self.path, kind=self.cfg.kind,
                      images=images, text=text, conversations=conversations,
                      meta=meta if isinstance(meta, dict) else {})

    def close(self) -> None:
        self.tar.close()


def _line_offsets(path: str) -> np.ndarray:
    """Byte offset of every non-empty line start (one pass over the file, no JSON parsing)."""
    offsets = []
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)


class _RowRangeSource:
    """Files of rows cut into virtual shards of `rows_per_shard` rows: name 'file#start-end'."""

    def __init__(self, cfg: SourceConfig, files: list[str], counts: list[int]):
        self.cfg = cfg
        self.files = files
        self.shards: list[str] = []
        self._ranges: list[tuple[int, int, int]] = []
        for fi, (f, n) in enumerate(zip(files, counts)):
            for start in range(0, n, cfg.rows_per_shard):
                end = min(n, start + cfg.rows_per_shard)
                self.shards.append(f"{f}#{start}-{end}")
                self._ranges.append((fi, start, end))

    def open(self, i: int) -> "RowRangeReader":
        fi, start, end = self._ranges[i]
        return RowRangeReader(self, fi, start, end, self.shards[i])


class RowRangeReader:
    random_access = True
    truncated = ""

    def __init__(self, source, fi: int, start: int, end: int, name: str):
        self.source, self.fi, self.start, self.end, self.name = source, fi, start, end, name

    def __len__(self) -> int:
        return self.end - self.start

    def get(self, j: int) -> Record:
        if not 0 <= j < len(self):
            raise IndexError(j)
        return self.source.record(self.fi, self.start + j, self.name)

    def close(self) -> None:
        pass


class JsonlSource(_RowRangeSource):
    """InternVL/LLaVA jsonl: {"id", "image": path | [paths], "conversations": [{"from", "value"}]}."""

    def __init__(self, cfg: SourceConfig):
        files = expand_paths(cfg.paths)
        self._offsets = [_line_offsets(f) for f in files]
        super().__init__(cfg, files, [len(o) for o in self._offsets])
        self._fh: dict[int, object] = {}

    def record(self, fi: int, row: int, shard: str) -> Record:
        fh = self._fh.get(fi)
        if fh is None:
            fh = self._fh[fi] = open(self.files[fi], "rb")
        fh.seek(int(self._offsets[fi][row]))
        key = f"{os.path.basename(self.files[fi])}:{row}"
        try:
            obj = json.loads(fh.readline())
        except ValueError as e:
            raise BadSample("missing_field", f"{key}: line does not parse as JSON: {e}") from None
        images = obj.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        blobs = []
        for rel in images:
            path = os.path.join(self.cfg.root, rel)
            try:
                with open(path, "rb") as f:
                    blobs.append(f.read())
            except OSError as e:
                raise BadSample("missing_file", f"{key}: image {path}: {e.strerror}") from None
        text = obj.get("text") if self.cfg.kind != "chat" else None
        if self.cfg.kind == "caption" and text is None:
            text = obj.get("caption")
        return Record(key=str(obj.get("id", key)), source=self.cfg.name, shard=shard, kind=self.cfg.kind,
                      images=blobs, text=text, conversations=obj.get("conversations"),
                      meta={k: v for k, v in obj.items() if k not in ("image", "conversations")})


def _image_bytes(value) -> list[bytes]:
    """An HF image cell as encoded bytes: bytes, {"bytes", "path"}, a PIL image, or a list of them."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [b for v in value for b in _image_bytes(v)]
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value)]
    if isinstance(value, dict):
        if value.get("bytes"):
            return [value["bytes"]]
        if value.get("path") and os.path.exists(value["path"]):
            with open(value["path"], "rb") as f:
                return [f.read()]
        return []
    if hasattr(value, "save"):                # a decoded PIL image: re-encode losslessly
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return [buf.getvalue()]
    raise BadSample("decode", f"image cell of type {type(value).__name__}")


class HFSource(_RowRangeSource):
    """Local HF data: parquet files (pyarrow; the row groups of the open virtual shard are kept,
    so `rows_per_shard` bounds memory and the in-shard permutation reads each group once), arrow files or a
    `save_to_disk` directory (memory-mapped `datasets.Dataset`, images left encoded)."""

    def __init__(self, cfg: SourceConfig):
        files = expand_paths(cfg.paths)
        self._tables: list = []
        counts = []
        for f in files:
            if f.endswith(".parquet"):
                import pyarrow.parquet as pq
                pf = pq.ParquetFile(f)
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                          for g in range(pf.num_row_groups)])
                self._tables.append(("parquet", pf, starts))
                counts.append(pf.metadata.num_rows)
            else:
                import datasets
                ds = datasets.load_from_disk(f) if os.path.isdir(f) else datasets.Dataset.from_file(f)
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds["train"]
                if cfg.image_column in ds.column_names:
                    ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
                self._tables.append(("arrow", ds, None))
                counts.append(len(ds))
        super().__init__(cfg, files, counts)
        self._groups: dict[tuple[int, int], list[dict]] = {}   # row groups of the open shard

    def open(self, i: int) -> RowRangeReader:
        self._groups.clear()                  # memory: at most one virtual shard's row groups
        return super().open(i)

    def _row(self, fi: int, row: int) -> dict:
        kind, table, starts = self._tables[fi]
        if kind == "arrow":
            return table[row]
        g = int(bisect_right(starts, row) - 1)
        if (fi, g) not in self._groups:
            self._groups[(fi, g)] = table.read_row_group(g).to_pylist()
        return self._groups[(fi, g)][row - int(starts[g])]

    def record(self, fi: int, row: int, shard: str) -> Record:
        r = self._row(fi, row)
        c = self.cfg
        return Record(key=f"{os.path.basename(self.files[fi])}:{row}", source=c.name, shard=shard, kind=c.kind,
                      images=_image_bytes(r.get(c.image_column)),
                      text=r.get(c.text_column) if c.kind != "chat" else None,
                      conversations=r.get(c.conversations_column) if c.kind == "chat" else None,
                      meta={k: v for k, v in r.items()
                            if k not in (c.image_column, c.text_column, c.conversations_column)})


class HFStreamingSource:
    """`datasets.load_dataset(..., streaming=True)`: one shard per dataset shard (file), read
    forward; a position is reached by iterating past earlier rows with images left encoded (no
    decoding), at most one shard's worth. HF's own shuffle buffer is not used (it is not saved):
    the stream's seeded shard order and slot assignment give the order."""

    def __init__(self, cfg: SourceConfig):
        import datasets
        files = expand_paths(cfg.paths)
        if files and all(f.endswith(".parquet") for f in files):
            ds = datasets.load_dataset("parquet", data_files=files, split=cfg.split, streaming=True)
        elif files and all(f.endswith((".json", ".jsonl")) for f in files):
            ds = datasets.load_dataset("json", data_files=files, split=cfg.split, streaming=True)
        else:
            ds = datasets.load_dataset(cfg.paths[0], split=cfg.split, streaming=True)
        if ds.features and cfg.image_column in ds.features:
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        self.cfg, self.ds = cfg, ds
        self.shards = [f"{cfg.paths[0]}#shard{i}of{ds.num_shards}" for i in range(ds.num_shards)]

    def open(self, i: int) -> "StreamingReader":
        return StreamingReader(self, i)


class StreamingReader:
    random_access = False
    truncated = ""

    def __init__(self, source: HFStreamingSource, i: int):
        self.source, self.name = source, source.shards[i]
        self._rows = iter(source.ds.shard(num_shards=source.ds.num_shards, index=i))
        self._next = 0

    def get(self, j: int) -> Record:
        if j < self._next:
            raise ValueError(f"{self.name}: streaming shards read forward only ({j} < {self._next})")
        while self._next <= j:
            row = next(self._rows, None)
            if row is None:
                raise IndexError(j)
            self._next += 1
        c = self.source.cfg
        return Record(key=f"{self.name}:{j}", source=c.name, shard=self.name, kind=c.kind,
                      images=_image_bytes(row.get(c.image_column)),
                      text=row.get(c.text_column) if c.kind != "chat" else None,
                      conversations=row.get(c.conversations_column) if c.kind == "chat" else None,
                      meta={k: v for k, v in row.items()
                            if k not in (c.image_column, c.text_column, c.conversations_column)})

    def close(self) -> None:
        self._rows = iter(())


SOURCES = {"webdataset": TarSource, "jsonl": JsonlSource, "hf": HFSource}


def build_source(cfg: SourceConfig):
    if cfg.format == "hf" and cfg.streaming:
        return HFStreamingSource(cfg)
    return SOURCES[cfg.format](cfg)
