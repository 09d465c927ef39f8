"""Self-attention with GQA and RoPE; optional visual attention experts (Mono-InternVL-1.5 style).

`AttentionProjections` holds one expert's q/k/v/o. With visual attention experts, image tokens are
projected by `attention_ve` and text tokens by `attention` (routed, each on its own tokens); the
attention itself is joint over all tokens of a sample.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from evip.model.config import ModelConfig
from evip.model.kv_cache import KVCache
from evip.model.packed_attention import AttentionContext, attend
from evip.model.rope import Rope, apply_rope
from evip.model.routing import Routing


class AttentionProjections(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, (heads + 2 kv_heads) * d] (q | k | v)."""
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def self_attention(x: torch.Tensor, text: AttentionProjections, visual: Optional[AttentionProjections],
                   cfg: ModelConfig, rope: Rope, ctx: AttentionContext, routing: Routing,
                   layer_idx: int, cache: Optional[KVCache] = None) -> torch.Tensor:
    """x [B, T, H] (already normed) -> attention output [B, T, H]."""
    b, t, hidden = x.shape
    flat = x.reshape(b * t, hidden)
    if visual is None:
        qkv = text.qkv(flat)
    else:
        qkv = routing.apply(flat, text.qkv, visual.qkv)
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q, k, v = qkv.view(b, t, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=2)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)
    out = attend(q, k, v, ctx).reshape(b * t, hq * d)
    if visual is None:
        out = text.o_proj(out)
    else:
        out = routing.apply(out, text.o_proj, visual.o_proj)
    return out.view(b, t, hidden)
