"""Upcycling a text LLM into Mono-InternVL: what each new parameter starts from.

- visual FFN `feed_forward_ve` (and visual attention `attention_ve`) = a copy of the text weights;
  with `model.visual_ffn=random` (an ablation) the visual FFN starts fresh like the patch embedding;
- new vocabulary rows (the image / grounding tokens) of the embedding and the head = the mean of
  the rows of the tokens the base tokenizer already had;
- patch embedding and projector: fresh, deterministic in (seed, parameter name), the model's init.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from evip.model.mono import INIT_STD

VISION_PREFIXES = ("vision.", "mlp1.")
_EXPERT_OF = {".feed_forward_ve.": ".feed_forward.", ".attention_ve.": ".attention."}


def text_source_of(name: str) -> str:
    """The text parameter a visual expert parameter is copied from (`name` itself otherwise)."""
    for expert, text in _EXPERT_OF.items():
        if expert in name:
            return name.replace(expert, text)
    return name


def is_expert_copy(name: str) -> bool:
    return text_source_of(name) != name


def is_vision(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def starts_fresh(name: str, visual_ffn: str) -> bool:
    """Whether upcycling initialises `name` rather than reading it from the LLM: the patch
    embedding and projector always; the visual FFN experts when `visual_ffn` is "random"."""
    return is_vision(name) or (visual_ffn == "random" and ".feed_forward_ve." in name)


@dataclass(frozen=True)
class VocabExtension:
    """How the vocabulary grows: `base_rows` rows in the checkpoint, `known` real tokens among them."""
    base_rows: int        # rows of the pretrained embedding / head
    known: int            # tokens the base tokenizer had (rows [0, known) are trained tokens)
    new_ids: tuple[int, ...]  # ids of the tokens added by `add_image_tokens`

    @property
    def rows(self) -> int:
        return max([self.base_rows, *(i + 1 for i in self.new_ids)])

    def extend(self, table: torch.Tensor) -> torch.Tensor:
        """[base_rows, H] -> [rows, H]; added and appended rows = mean of the known rows."""
        if table.shape[0] != self.base_rows:
            raise ValueError(f"vocabulary table has {table.shape[0]} rows, expected {self.base_rows}")
        mean = table[: min(self.known, self.base_rows)].double().mean(0).to(table.dtype)
        out = table.new_empty(self.rows, *table.shape[1:])
        out[: self.base_rows] = table
        out[self.base_rows:] = mean
        if self.new_ids:
            out[list(self.new_ids)] = mean
        return out


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def init_vision_param(name: str, shape: torch.Size, seed: int, std: float = INIT_STD) -> torch.Tensor:
    """A fresh patch-embedding / projector (or random visual FFN) parameter, the scheme of `MonoInternVL.init_weights`:
    normal(0, std) for conv / linear weights and the class / position embeddings, zero biases,
    LayerNorm ones / zeros. Deterministic in (seed, name), whatever order parameters are visited in.
    """
    t = torch.empty(shape, dtype=torch.float32)
    if name.startswith("mlp1.0."):                     # the projector's LayerNorm(4D)
        return t.fill_(1.0 if name.endswith(".weight") else 0.0)
    if name.endswith(".bias"):
        return t.zero_()
    return t.normal_(0.0, std, generator=_generator(seed, name))
