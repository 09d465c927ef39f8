"""Mono-InternVL: a decoder-only LLM whose layers carry visual experts, fed image patches directly.

    model = MonoInternVL(cfg)                     # random init (deterministic under torch.manual_seed)
    with torch.device("meta"):                    # or: no memory at all, for loading a 2B checkpoint;
        model = MonoInternVL(cfg)                 #     then model.to_empty(device=...) and load
    out = model(**batch)                          # batch as in evip/batch.py -> ModelOutput

Parameter names (state_dict keys) are a contract with weights.py and groups.py:
`vision.*`, `mlp1.*`, `tok_embeddings`, `layers.{i}.{attention_norm, attention, attention_ve,
ffn_norm, feed_forward, feed_forward_ve}.*`, `norm`, `output` (absent when the head is tied).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from evip.model.config import ModelConfig
from evip.model.decoder import DecoderLayer
from evip.model.kv_cache import KVCache
from evip.model.layout import PackedLayout
from evip.model.loss import head_lm_loss, labelled_positions, packed_lm_loss
from evip.model.norm import RMSNorm
from evip.model.packed_attention import AttentionContext, cached_context, choose_impl, packed_context
from evip.model.rope import rope_base, rope_for
from evip.model.routing import Routing
from evip.model.vision import PatchEmbedding, build_projector, shuffle_patches

INIT_STD = 0.02


class ModelOutput(dict):
    """The forward's result: a dict with attribute access (`out.loss`), like HF's ModelOutput.

    A dict and not a dataclass because DeepSpeed ZeRO-3 walks dicts, tuples and lists of a
    module's output to hook the backward pass: tensors inside a dataclass are hidden from it."""

    def __init__(self, logits: Optional[torch.Tensor] = None,     # [B, T, V]; None if return_logits=False
                 loss: Optional[torch.Tensor] = None,             # mean CE over labelled positions
                 loss_sum: Optional[torch.Tensor] = None,         # fp32 scalar
                 num_tokens: Optional[torch.Tensor] = None,       # int64 scalar
                 kind_loss_sum: Optional[torch.Tensor] = None,    # fp32 [3]: caption, chat, text
                 kind_num_tokens: Optional[torch.Tensor] = None):  # int64 [3]
        super().__init__(logits=logits, loss=loss, loss_sum=loss_sum, num_tokens=num_tokens,
                         kind_loss_sum=kind_loss_sum, kind_num_tokens=kind_num_tokens)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class MonoInternVL(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = PatchEmbedding(cfg)
        self.mlp1 = build_projector(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init, in module order (deterministic under torch.manual_seed): normal(0, 0.02)
        for linear/conv/embedding weights and the class/position embeddings, zero biases, unit
        norms. Call after `to_empty()` when the model was built on the meta device."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, PatchEmbedding):
                module.reset_parameters()

    # ---- embedding ------------------------------------------------------------------------
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, tokens_per_tile, H]."""
        self._check_pixels(pixel_values)
        patches = self.vision(pixel_values)
        return self.mlp1(shuffle_patches(patches, self.cfg.downsample_ratio))

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        s = self.cfg.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must have shape [N, 3, {s}, {s}] (ModelConfig.image_size={s}), "
                             f"got {list(pixel_values.shape)}")

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with image embeddings written at the <IMG_CONTEXT> positions.
        Returns (embeddings [B, T, H], image mask [B, T])."""
        h, image_mask, _ = self.embed_routed(input_ids, pixel_values)
        return h, image_mask

    def embed_routed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                     routing: Optional[Routing] = None) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """`embed` and the text/image routing of the tokens, sharing one host sync (the count of
        image tokens, checked against the tiles); none when `routing` is given (the batch's layout)."""
        image_mask = input_ids == self.cfg.img_context_token_id
        h = self.tok_embeddings(input_ids)
        num_image_tokens = int(image_mask.sum().item()) if routing is None else routing.image_idx.numel()
        if pixel_values is not None:
            self._check_pixels(pixel_values)
        num_tiles = 0 if pixel_values is None else pixel_values.shape[0]
        expected = num_tiles * self.cfg.tokens_per_tile
        if num_image_tokens != expected:
            raise ValueError(
                f"input_ids hold {num_image_tokens} <IMG_CONTEXT> tokens (id {self.cfg.img_context_token_id}) "
                f"but pixel_values has {num_tiles} tiles x {self.cfg.tokens_per_tile} tokens per tile = {expected}")
        if routing is None:
            routing = Routing.from_mask(image_mask, num_image_tokens)
        if pixel_values is not None:   # even with 0 tiles: the patch embedding then gets zero grads, not none
            images = self.embed_images(pixel_values).to(h.dtype)
            b, t, hidden = h.shape
            h = h.reshape(b * t, hidden).index_copy(0, routing.image_idx, images.reshape(-1, hidden)).view(b, t, hidden)
        return h, image_mask, routing

    # ---- decoder --------------------------------------------------------------------------
    def decode(self, h: torch.Tensor, image_mask: torch.Tensor, position_ids: torch.Tensor,
               ctx: AttentionContext, cache: Optional[KVCache] = None, routing: Optional[Routing] = None
               ) -> torch.Tensor:
        """Run the layers and the final norm on embeddings h [B, T, H] (`routing` from `embed_routed`,
        else from image_mask)."""
        seq_len = h.shape[1] + (cache.length if cache is not None else 0)   # attended length (rope.py)
        rope = rope_for(position_ids, self.cfg.head_dim, rope_base(self.cfg, seq_len), h.dtype)
        routing = routing if routing is not None else Routing.from_mask(image_mask)
        use_ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_ckpt:
                h = checkpoint(layer, h, rope, ctx, routing, cache, use_reentrant=False)
            else:
                h = layer(h, rope, ctx, routing, cache)
        return self.norm(h)

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.head_weight())

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                seq_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, kind_ids: Optional[torch.Tensor] = None,
                layout: Optional[PackedLayout] = None, *, kv_cache: Optional[KVCache] = None,
                return_logits: bool = True) -> ModelOutput:
        """A packed micro-batch (evip/batch.py) -> ModelOutput.

        `layout` (the data loader's, evip/model/layout.py): the routing, labelled positions and
        attention segments are taken from it instead of being searched for on the device, so the
        forward makes no host sync; without it they are computed here (same values).

        `return_logits=False` (with labels): the head runs only on the labelled positions, in chunks
        (loss.head_lm_loss), and `logits` is None; same loss and gradients, with no [B, T, vocab]
        or [labelled, vocab] tensor (training).
        With `kv_cache` (generation; B = the cache's rows) the tokens continue the cached ones and
        positions default to follow them."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {list(input_ids.shape)}")
        b, t = input_ids.shape
        past = 0 if kv_cache is None else kv_cache.length
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        if seq_ids is None:
            seq_ids = torch.zeros_like(input_ids)
        for name, tensor in (("position_ids", position_ids), ("seq_ids", seq_ids), ("labels", labels),
                             ("kind_ids", kind_ids)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {list(input_ids.shape)}, "
                                 f"got {list(tensor.shape)}")
        if layout is not None:
            if kv_cache is not None:
                raise ValueError("a batch layout describes a packed forward without a KV cache; drop the "
                                 "'layout' key when decoding with kv_cache")
            layout.check(input_ids)
        h, image_mask, routing = self.embed_routed(input_ids, pixel_values,
                                                   None if layout is None else layout.routing)
        if kv_cache is None:
            ctx = packed_context(seq_ids, choose_impl(self.cfg.attn_impl, h.dtype, h.device), layout)
        else:
            if b != kv_cache.batch:
                raise ValueError(f"decoding with a KV cache of {kv_cache.batch} rows takes B={kv_cache.batch}, "
                                 f"got B={b}")
            ctx = cached_context(t, past, h.device)
        h = self.decode(h, image_mask, position_ids, ctx, kv_cache, routing)
        if kv_cache is not None:
            kv_cache.advance(t)
        if labels is None:
            return ModelOutput(logits=self.head(h))
        labelled = None if layout is None else (layout.loss_idx, layout.loss_targets)
        if return_logits:
            logits = self.head(h)
            parts = packed_lm_loss(logits, labels, seq_ids, kind_ids, labelled)
        else:
            logits = None
            sel, targets = labelled if labelled is not None else labelled_positions(labels, seq_ids)
            kinds = None if kind_ids is None else kind_ids.reshape(-1).index_select(0, sel)
            parts = head_lm_loss(h.reshape(b * t, -1).index_select(0, sel), self.head_weight(), targets, kinds)
        return ModelOutput(logits, parts.loss, parts.loss_sum, parts.num_tokens, parts.kind_loss_sum,
                           parts.kind_num_tokens)

    # ---- generation -----------------------------------------------------------------------
    def new_kv_cache(self, max_len: int, batch: int = 1) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.cfg.num_layers, batch, self.cfg.num_kv_heads, self.cfg.head_dim, max_len,
                       p.dtype, p.device)

    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None, eos_token_id: Optional[int] = None,
                 use_cache: bool = True) -> torch.Tensor:
        """New tokens [1, n] after the prompt input_ids [1, T] (see generate.py)."""
        from evip.model.generate import generate
        return generate(self, input_ids, pixel_values, max_new_tokens, temperature, top_p, generator,
                        eos_token_id, use_cache)
