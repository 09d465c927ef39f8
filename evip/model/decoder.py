"""One decoder layer: shared (or expert) attention, then modality-routed SwiGLU experts.

    h   = x + attn(attention_norm(x))                    (joint over the tokens of each sample)
    out = h + FFN_t(ffn_norm(h)) on text tokens, FFN_v(ffn_norm(h)) on image tokens
          (h + FFN_t(ffn_norm(h)) on every token for a model without visual experts)

Each FFN runs only on its own tokens (see routing.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from evip.model.attention import AttentionProjections, self_attention
from evip.model.config import ModelConfig
from evip.model.experts import SwiGLU
from evip.model.kv_cache import KVCache
from evip.model.norm import RMSNorm
from evip.model.packed_attention import AttentionContext
from evip.model.rope import Rope
from evip.model.routing import Routing


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = AttentionProjections(cfg)
        self.attention_ve = AttentionProjections(cfg) if cfg.visual_attention_experts else None
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        # model.visual_ffn=none (an ablation): no visual expert, image tokens use the text FFN
        self.feed_forward_ve = SwiGLU(cfg.hidden_size, cfg.intermediate_size) if cfg.has_visual_ffn else None

    def attention_block(self, x: torch.Tensor, rope: Rope, ctx: AttentionContext, routing: Routing,
                        cache: Optional[KVCache] = None) -> torch.Tensor:
        return x + self_attention(self.attention_norm(x), self.attention, self.attention_ve,
                                  self.cfg, rope, ctx, routing, self.layer_idx, cache)

    def ffn_block(self, h: torch.Tensor, routing: Routing) -> torch.Tensor:
        b, t, hidden = h.shape
        normed = self.ffn_norm(h).reshape(b * t, hidden)
        if self.feed_forward_ve is None:
            return h + self.feed_forward(normed).view(b, t, hidden)
        return h + routing.apply(normed, self.feed_forward, self.feed_forward_ve).view(b, t, hidden)

    def forward(self, x: torch.Tensor, rope: Rope, ctx: AttentionContext, routing: Routing,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        return self.ffn_block(self.attention_block(x, rope, ctx, routing, cache), routing)
