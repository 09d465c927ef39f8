"""Rotary position embedding, HF Llama convention (`rotate_half`, cos/sin of [freqs, freqs]).

Positions come from `position_ids`, so packed samples restart at 0. The inverse frequencies are
computed on the fly (no buffer): a model built on the meta device needs nothing re-initialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rope:
    """cos / sin for every token, shape [B, T, head_dim], in the activation dtype."""
    cos: torch.Tensor
    sin: torch.Tensor


def rope_for(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """cos/sin tables for `position_ids` [B, T] (computed in fp32, then cast to `dtype`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq            # [B, T, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return Rope(cos=emb.cos().to(dtype), sin=emb.sin().to(dtype))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate `x` [B, T, heads, head_dim]."""
    cos, sin = rope.cos.unsqueeze(2), rope.sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin
