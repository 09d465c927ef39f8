"""Rotary position embedding, HF Llama convention (`rotate_half`, cos/sin of [freqs, freqs]).

Positions come from `position_ids`, so packed samples restart at 0. The inverse frequencies are
computed on the fly (no buffer): a model built on the meta device needs nothing re-initialised.

Dynamic NTK scaling (`rope_scaling: {type: dynamic, factor: f}`), as InternLM2's official
modelling code (InternLM2DynamicNTKScalingRotaryEmbedding) and HF Llama compute it: a forward
whose sequence is `seq_len` tokens long (cached ones included) uses the base

    theta * (f * seq_len / max_position_embeddings - (f - 1)) ** (head_dim / (head_dim - 2))

for *every* position once seq_len > max_position_embeddings, the plain theta otherwise. `seq_len`
is the attended length, as the official attention passes it (kv length: past + new tokens, the
whole packed row in packed training). Generating past max_position_embeddings, each step's new
token gets the base of its own length while cached keys keep theirs, as in the official code.
Unlike the official module, nothing is remembered between calls: a later shorter sequence gets
the plain base again (the official instance keeps its enlarged table until reloaded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rope:
    """cos / sin for every token, shape [B, T, head_dim], in the activation dtype."""
    cos: torch.Tensor
    sin: torch.Tensor


def dynamic_ntk_base(theta: float, head_dim: int, seq_len: int, max_position_embeddings: int,
                     factor: float) -> float:
    """The RoPE base of dynamic NTK scaling for a sequence of `seq_len` tokens (module docstring)."""
    if seq_len <= max_position_embeddings:
        return theta
    return theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))


def rope_base(cfg, seq_len: int) -> float:
    """The RoPE base a forward over `seq_len` tokens uses under `cfg` (a ModelConfig)."""
    if cfg.rope_scaling == "dynamic":
        return dynamic_ntk_base(cfg.rope_theta, cfg.head_dim, seq_len, cfg.max_position_embeddings,
                                cfg.rope_scaling_factor)
    return cfg.rope_theta


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
