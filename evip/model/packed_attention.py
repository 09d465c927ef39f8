"""The attention kernel over packed rows: causal AND within one sample.

A packed row holds several samples (`seq_ids` 0, 1, ... and -1 for padding). A token attends to
earlier tokens of its own sample only. Two implementations, picked at run time:

- `sdpa`: `F.scaled_dot_product_attention` with a boolean block mask [B, 1, Tq, Tk]. Every token
  sees at least itself (padding tokens see earlier padding), so no softmax row is empty (no NaN).
- `flash`: flash-attn's `flash_attn_varlen_func` with `cu_seqlens` (one segment per run of equal
  seq_id within a row). Used when flash-attn is installed, `attn_impl` is `auto` or `flash`, and
  the tensors are CUDA fp16/bf16. flash-attn is imported lazily, only on that path.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

IMPLS = ("auto", "sdpa", "flash")


@dataclass
class AttentionContext:
    """How the current forward attends. `mask` for sdpa; `cu_seqlens`/`max_seqlen` for flash."""
    impl: str
    mask: Optional[torch.Tensor] = None          # bool [B, 1, Tq, Tk], True = may attend; None = plain causal
    cu_seqlens: Optional[torch.Tensor] = None    # int32 [num_segments + 1]
    max_seqlen: int = 0


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_impl(attn_impl: str, dtype: torch.dtype, device: torch.device) -> str:
    """Resolve `ModelConfig.attn_impl` for tensors of this dtype/device."""
    if attn_impl not in IMPLS:
        raise ValueError(f"ModelConfig.attn_impl={attn_impl!r} is not one of {IMPLS}")
    if attn_impl == "sdpa":
        return "sdpa"
    usable = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if attn_impl == "flash":
        if not flash_attn_installed():
            raise RuntimeError("ModelConfig.attn_impl='flash' but flash-attn is not installed "
                               "(pip install flash-attn), or set attn_impl to 'auto' or 'sdpa'")
        if not usable:
            raise RuntimeError(f"ModelConfig.attn_impl='flash' needs CUDA fp16/bf16 tensors, got "
                               f"{dtype} on {device.type}; set attn_impl to 'auto' or 'sdpa'")
        return "flash"
    return "flash" if usable and flash_attn_installed() else "sdpa"


def packed_context(seq_ids: torch.Tensor, impl: str) -> AttentionContext:
    """The context of a packed forward without a KV cache; seq_ids [B, T]."""
    if impl == "flash":
        b, t = seq_ids.shape
        flat = seq_ids.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::t] = True                       # a row start is always a segment start
        idx = starts.nonzero().squeeze(1)
        cu = torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)
        return AttentionContext(impl="flash", cu_seqlens=cu,
                                max_seqlen=int((cu[1:] - cu[:-1]).max().item()))
    if bool((seq_ids == 0).all()):               # one whole sample per row: the causal kernel, no mask
        return AttentionContext(impl="sdpa")
    t = seq_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()
    same = seq_ids.unsqueeze(2) == seq_ids.unsqueeze(1)           # [B, T, T]
    return AttentionContext(impl="sdpa", mask=(same & causal).unsqueeze(1))


def cached_context(q_len: int, past_len: int, device: torch.device) -> AttentionContext:
    """Decoding one sample with a KV cache: query i (position past_len + i) sees keys <= it."""
    mask = torch.ones(q_len, past_len + q_len, dtype=torch.bool, device=device).tril(past_len)
    return AttentionContext(impl="sdpa", mask=mask[None, None])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [B, Tq, Hq, d], k/v [B, Tk, Hkv, d] (GQA: Hq multiple of Hkv) -> [B, Tq, Hq * d]."""
    b, tq, hq, d = q.shape
    if ctx.impl == "flash":
        from flash_attn import flash_attn_varlen_func  # lazy: GPU-only dependency

        out = flash_attn_varlen_func(
            q.reshape(b * tq, hq, d), k.reshape(-1, k.shape[2], d), v.reshape(-1, v.shape[2], d),
            cu_seqlens_q=ctx.cu_seqlens, cu_seqlens_k=ctx.cu_seqlens,
            max_seqlen_q=ctx.max_seqlen, max_seqlen_k=ctx.max_seqlen, causal=True)
        return out.reshape(b, tq, hq * d)
    if hq != k.shape[2]:
        # Expand the KV heads rather than `enable_gqa`: with a mask, CUDA's memory-efficient
        # kernel takes expanded heads, while enable_gqa would fall back to the O(T^2) math kernel.
        k = k.repeat_interleave(hq // k.shape[2], dim=2)
        v = v.repeat_interleave(hq // v.shape[2], dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx.mask,
        is_causal=ctx.mask is None)
    return out.transpose(1, 2).reshape(b, tq, hq * d)
