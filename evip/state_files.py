"""Python state (a data loader's state_dict, RNG states) on disk as JSON + safetensors, never pickle.

    write_state(state, directory, "rank0")     # rank0.json, and rank0.safetensors if it holds arrays
    state = read_state(directory, "rank0")

The round trip is exact for what such states are made of: dicts (any scalar keys), lists, tuples,
str, int, float (nan and inf included), bool, None, bytes, numpy scalars and arrays, torch tensors.
Anything else is a TypeError naming where in the state it sits. Loading runs no code, unlike a
pickle (`torch.load(weights_only=False)`), so a checkpoint from elsewhere cannot execute anything.
Both files are fsynced; the checkpoint's manifest (evip/checkpoint.py) proves them whole later.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = "__evip_state__"


def _encode(obj: Any, arrays: dict[str, torch.Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str, int, float)):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"a{len(arrays)}"
        arrays[key] = obj.detach().cpu().contiguous()
        return {TAG: "tensor", "key": key}
    if isinstance(obj, (np.ndarray, np.generic)):
        arr = np.asarray(obj)
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise TypeError(f"state at {where}: numpy array of dtype {arr.dtype} cannot be stored without pickle")
        key = f"a{len(arrays)}"
        arrays[key] = torch.from_numpy(np.array(arr, copy=True, order="C"))
        return {TAG: "ndarray" if isinstance(obj, np.ndarray) else "npscalar", "key": key}
    if isinstance(obj, bytes):
        return {TAG: "bytes", "b64": base64.b64encode(obj).decode()}
    if isinstance(obj, tuple):
        return {TAG: "tuple", "items": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: _encode(v, arrays, f"{where}.{k}") for k, v in obj.items()}
        return {TAG: "dict", "items": [[_encode(k, arrays, f"{where}<key>"), _encode(v, arrays, f"{where}[{k!r}]")]
                                       for k, v in obj.items()]}
    raise TypeError(f"state at {where}: a {type(obj).__name__} cannot be stored as JSON/safetensors; "
                    f"make the state_dict return plain Python values, numpy arrays or tensors")


def _decode(obj: Any, arrays: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(TAG)
    if kind is None:
        return {k: _decode(v, arrays) for k, v in obj.items()}
    if kind == "tensor":
        return arrays[obj["key"]]
    if kind == "ndarray":
        return arrays[obj["key"]].numpy()
    if kind == "npscalar":
        return arrays[obj["key"]].numpy()[()]
    if kind == "bytes":
        return base64.b64decode(obj["b64"])
    if kind == "tuple":
        return tuple(_decode(v, arrays) for v in obj["items"])
    if kind == "dict":
        return {_decode(k, arrays): _decode(v, arrays) for k, v in obj["items"]}
    raise ValueError(f"unknown state tag {kind!r}")


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_state(state: Any, directory: Path, name: str) -> list[Path]:
    """`name`.json (+ `name`.safetensors when the state holds arrays) in `directory`; the files written."""
    from safetensors.torch import save

    arrays: dict[str, torch.Tensor] = {}
    doc = {"state": _encode(state, arrays, name), "arrays": bool(arrays)}
    out = []
    if arrays:
        out.append(Path(directory) / f"{name}.safetensors")
        _write_bytes(out[-1], save(arrays))
    out.append(Path(directory) / f"{name}.json")
    _write_bytes(out[-1], json.dumps(doc).encode())
    return out


def read_state(directory: Path, name: str) -> Any:
    from safetensors.torch import load_file

    doc = json.loads((Path(directory) / f"{name}.json").read_text())
    arrays = load_file(str(Path(directory) / f"{name}.safetensors")) if doc["arrays"] else {}
    return _decode(doc["state"], arrays)
