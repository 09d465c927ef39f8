"""Build a model on the meta device and materialise each parameter exactly once.

    model = build_empty(cfg)                      # parameters on `meta`: no memory
    materialize(model, produce, dtype, device)    # produce(name, shape) -> the tensor for it

`produce` is called once per parameter (in state-dict order) and may read it from a streamed
checkpoint, derive it (unpack wqkv, copy the text FFN into the visual FFN, add vocabulary rows) or
initialise it. The tensor is assigned, not copied, so peak memory is the model's bytes plus the
transient tensors of a single `produce` call. With `dtype`/`device` (e.g. bf16 on the training
GPU) each tensor is cast and moved as it comes, so host memory holds one tensor at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from evip.model.config import ModelConfig
from evip.model.safetensors_io import CheckpointError, ShapeMismatchError

Produce = Callable[[str, torch.Size], torch.Tensor]


def build_empty(cfg: ModelConfig) -> nn.Module:
    """The model with its parameters on the meta device (buffers such as RoPE tables stay real)."""
    from accelerate import init_empty_weights

    from evip.model.mono import MonoInternVL

    with init_empty_weights(include_buffers=False):
        return MonoInternVL(cfg)


def materialize(model: nn.Module, produce: Produce, dtype: torch.dtype | None = None,
                where: Callable[[str], str] = lambda name: "the checkpoint",
                device: torch.device | str | None = None) -> nn.Module:
    """Fill every meta parameter of `model` with `produce(name, shape)`, cast to `dtype` (floating
    tensors) and moved to `device` if given."""
    names = [n for n, p in model.named_parameters() if p.is_meta]
    shapes = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for name in names:
        expected = shapes[name].shape
        tensor = produce(name, expected)
        if tuple(tensor.shape) != tuple(expected):
            raise ShapeMismatchError(
                f"shape mismatch for '{name}' (from {where(name)}): the model expects {tuple(expected)}, "
                f"the checkpoint has {tuple(tensor.shape)}; check the config matches the weights")
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if device is not None:
            tensor = tensor.to(device)
        loaded[name] = tensor
    # assign=True: the tensors become the parameters (no second copy).
    model.load_state_dict(loaded, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"parameters left unmaterialised after loading: {left[:8]}")
    return model
