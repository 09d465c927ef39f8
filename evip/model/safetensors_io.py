"""Streamed safetensors I/O: read one tensor at a time from a single or sharded checkpoint; write shards.

Reading never holds more than the tensor asked for: each `get` reads that tensor's bytes from
the file holding it into a tensor of its own (no memory map stays resident, and no tensor
depends on the file afterwards).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model; the message names the cause."""


class MissingTensorError(CheckpointError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class ShapeMismatchError(CheckpointError):
    pass


def read_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, {name: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class SafetensorsCheckpoint:
    """The tensors of a directory holding `model.safetensors` or a sharded `model.safetensors.index.json`.

    `get` reads one tensor with `readinto` straight into a fresh tensor: a single allocation per
    tensor, no memory map (a mapped tensor would depend on the file staying unchanged, and would
    be counted twice while being copied out).
    """

    fresh = True  # every `get` returns a new tensor: a visual expert can keep it without a copy

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {k: self.directory / f for k, f in weight_map.items()}
            self.described_by = index
        elif single.is_file():
            self._files = {k: single for k in read_header(single)[1]}
            self.described_by = single
        else:
            raise CheckpointError(
                f"no safetensors weights in {self.directory}: expected {SINGLE_FILE} or {INDEX_FILE} "
                "(.bin / .pth checkpoints are not supported: convert them with save_pretrained(safe_serialization=True))")
        for path in sorted(set(self._files.values())):
            if not path.is_file():
                raise CheckpointError(f"shard {path} listed in {self.described_by} is missing")
        self._headers: dict[Path, tuple[int, dict]] = {}

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def file_of(self, key: str) -> Path:
        if key not in self._files:
            raise MissingTensorError(
                f"tensor '{key}' is missing from the checkpoint {self.described_by} "
                f"({len(self._files)} tensors there)")
        return self._files[key]

    def _entry(self, key: str) -> tuple[Path, int, dict]:
        path = self.file_of(key)
        if path not in self._headers:
            self._headers[path] = read_header(path)
        data_start, header = self._headers[path]
        if key not in header:
            raise MissingTensorError(f"tensor '{key}' is listed in {self.described_by} but missing from {path}")
        return path, data_start, header[key]

    def get(self, key: str) -> torch.Tensor:
        path, data_start, entry = self._entry(key)
        begin, end = entry["data_offsets"]
        tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        if end > begin:
            buffer = tensor.view(-1).view(torch.uint8).numpy()
            with open(path, "rb") as fh:
                fh.seek(data_start + begin)
                if fh.readinto(buffer) != end - begin:
                    raise CheckpointError(f"{path} is truncated: tensor '{key}' needs bytes {begin}..{end} of its data")
        return tensor

    def dtype_of(self, key: str) -> torch.dtype:
        """The stored dtype of `key`, read from the file header only."""
        return _DTYPES[self._entry(key)[2]["dtype"]]

    def where(self, key: str) -> str:
        return str(self._files.get(key, self.described_by))


def _shard_plan(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_safetensors(tensors: Mapping[str, torch.Tensor], directory: str | Path,
                      max_shard_bytes: int = 5 * 1024**3, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write `tensors` as `model.safetensors`, or as HF-style shards + index when over `max_shard_bytes`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    plan = _shard_plan(sizes, max_shard_bytes)
    meta = {"format": "pt", **(metadata or {})}

    def contiguous(keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {k: tensors[k].detach().contiguous() for k in keys}

    if len(plan) == 1:
        path = directory / SINGLE_FILE
        save_file(contiguous(plan[0]), str(path), metadata=meta)
        return [path]
    paths, weight_map = [], {}
    for i, keys in enumerate(plan, start=1):
        path = directory / f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file(contiguous(keys), str(path), metadata=meta)
        weight_map.update({k: path.name for k in keys})
        paths.append(path)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return paths
