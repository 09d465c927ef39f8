"""The weights a stage hands on: consolidated fp32 `model.safetensors` in the stage directory,
then `DONE` (the stage is finished); a stage's model is built from its input weights tensor by
tensor in its precision on its device."""
from __future__ import annotations

from pathlib import Path

import torch

from evip.atomic_files import publish

WEIGHTS = "model.safetensors"
DONE = "DONE"


def build_from_weights(model_cfg, path: Path, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu"):
    """A fresh MonoInternVL whose every parameter is read from the safetensors file `path`, in
    `dtype` on `device` (default fp32 on the CPU, the file's values exactly). Tensor by tensor from
    the memory-mapped file: a build on a GPU holds one tensor in host memory at a time, never the model."""
    from safetensors import safe_open

    from evip.model.meta_load import build_empty, materialize

    model = build_empty(model_cfg)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())

        def produce(name, shape):
            if name not in keys:
                raise KeyError(f"{path} has no tensor {name!r}: it was written for another model config")
            return f.get_tensor(name)
        materialize(model, produce, dtype, lambda name: str(path), device)
    return model


def restore_fp32_masters(engine, weights: Path) -> int:
    """Under bf16 DeepSpeed makes its fp32 master weights from the bf16-cast module, which would
    round every trained parameter at each stage start; set them from the fp32 file instead
    (collective under ZeRO-3). Returns how many were set."""
    from safetensors import safe_open
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    n = 0
    with safe_open(str(weights), framework="pt") as f:
        for name, p in engine.module.named_parameters():
            if p.requires_grad and safe_get_full_fp32_param(p) is not None:
                safe_set_full_fp32_param(p, f.get_tensor(name).float().to(engine.device))
                n += 1
    return n


def consolidated_state(engine, start_weights: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """fp32 weights of the whole model at this instant (collective under ZeRO-3); rank 0 gets them.

    Trained parameters come from DeepSpeed's fp32 master copy (`safe_get_full_fp32_param`, exact
    under bf16 and every ZeRO stage); frozen ones are read back from the stage's input weights,
    which `verify_frozen` proves they still equal."""
    from safetensors import safe_open
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    frozen = []
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            frozen.append(name)
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:   # ZeRO-0 fp32: the module holds the master weights itself
            full = p.detach()
        if rank == 0:
            out[name] = full.detach().float().cpu().clone()
    if rank != 0:
        return None
    with safe_open(str(start_weights), framework="pt") as f:
        for name in frozen:
            out[name] = f.get_tensor(name).float()
    return out


def write_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors, published atomically (temp file + fsync + rename)."""
    from safetensors.torch import save_file

    publish(path, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                                        metadata={"format": "pt"}))
