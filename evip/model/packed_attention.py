"""The attention kernel over packed rows: causal AND within one sample.

A packed row holds several samples (`seq_ids` 0, 1, ... and -1 for padding), each written as one
run of positions. One mask definition, `may_attend`: query i sees key j iff j <= i and both carry
the same seq_id (padding tokens see earlier padding, so no softmax row is empty: no NaN). The
kernels, picked at run time (`ModelConfig.attn_impl`), all implement it:

- `sdpa` (the reference the tests compare against): `F.scaled_dot_product_attention` with the
  dense boolean mask [B, 1, T, T] (or SDPA's causal kernel when every row is one sample). O(T^2)
  memory: on CUDA the mask becomes a dense bias kept for backward in every layer.
- `flex`: `flex_attention` with a document-causal `BlockMask` built from per-block seq_id ranges
  (O((T/128)^2) memory, blocks without an allowed pair skipped, `may_attend` evaluated inside
  partial blocks only). Compiled on GPU. torch 2.13 has no flex backward on CPU: forward only there.
- `varlen`: torch's own `torch.nn.attention.varlen.varlen_attn` (flash-attention varlen kernels
  shipped with torch, no extra package) over `cu_seqlens` (one segment per run of equal seq_id
  within a row; a row start always starts a segment). CUDA fp16/bf16 on sm80+.
- `flash`: flash-attn's `flash_attn_varlen_func` with the same `cu_seqlens`, when installed AND
  importable (a wheel built for another torch fails at import: `auto` then logs one line and
  moves on).

`auto`: CUDA fp16/bf16 -> varlen, else flash-attn, else flex; CUDA fp32 -> flex; CPU -> sdpa.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F

IMPLS = ("auto", "sdpa", "flex", "varlen", "flash")
FLEX_BLOCK = 128          # flex_attention's default tile (queries and keys)

if TYPE_CHECKING:
    from evip.model.layout import PackedLayout

log = logging.getLogger(__name__)


@dataclass
class AttentionContext:
    """How the current forward attends: `mask` for sdpa, `block_mask` for flex, `cu_seqlens` and
    `max_seqlen` for varlen and flash."""
    impl: str
    mask: Optional[torch.Tensor] = None          # bool [B, 1, Tq, Tk], True = may attend; None = plain causal
    block_mask: Any = None                       # torch.nn.attention.flex_attention.BlockMask
    cu_seqlens: Optional[torch.Tensor] = None    # int32 [num_segments + 1]
    max_seqlen: int = 0


# ---- the one definition ---------------------------------------------------------------------

def may_attend(seq_q: torch.Tensor, seq_k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """Query at position q_idx (sample seq_q) may attend the key at k_idx (sample seq_k)."""
    return (seq_q == seq_k) & (q_idx >= k_idx)


def dense_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """`may_attend` over every (query, key) pair of each row: bool [B, T, T]."""
    idx = torch.arange(seq_ids.shape[1], device=seq_ids.device)
    return may_attend(seq_ids[:, :, None], seq_ids[:, None, :], idx[:, None], idx[None, :])


def cu_seqlens(seq_ids: torch.Tensor) -> torch.Tensor:
    """int32 [num_segments + 1]: starts of the runs of equal seq_id over the flattened rows, then
    B*T. A row start is always a segment start (rows [[0, 0], [0, 0]] give [0, 2, 4], else attention
    would cross rows). Causal attention within each segment is `may_attend` for samples written as
    one run each (padding: one run at the row's end)."""
    b, t = seq_ids.shape
    flat = seq_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::t] = True
    idx = starts.nonzero().squeeze(1)                   # a host sync (the segment count)
    return torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)


def segment_max_len(cu: torch.Tensor) -> int:
    """The longest segment of `cu_seqlens` (a host sync when cu is on a GPU)."""
    return int((cu[1:] - cu[:-1]).max().item())


def flex_block_mask(seq_ids: torch.Tensor):
    """A flex_attention BlockMask of `may_attend` without any T x T tensor. Per 128-position block,
    the range [min, max] of its seq_ids: a key block before or at a query block holds an allowed
    pair only if the ranges overlap (else it is skipped); it is full (no mask evaluated) if it lies
    strictly before and both blocks are one and the same sample; otherwise partial (`may_attend`
    per element). Exact for any layout; sparsest for the packer's contiguous runs."""
    from torch.nn.attention.flex_attention import BlockMask

    b, t = seq_ids.shape
    n = -(-t // FLEX_BLOCK)
    padded = F.pad(seq_ids, (0, n * FLEX_BLOCK - t), value=-2)        # never equal to a real id
    # ranges over ids with padding (-1) after every sample and past-the-end (-2) after that: the
    # packer's rows are then non-decreasing, and a range overlap is an allowed pair
    order = torch.where(padded >= 0, padded, t - padded)
    blocks = order.view(b, n, FLEX_BLOCK)
    lo, hi = blocks.min(-1).values, blocks.max(-1).values            # [B, n]
    qlo, qhi, klo, khi = lo[:, :, None], hi[:, :, None], lo[:, None, :], hi[:, None, :]
    tri = torch.ones(n, n, dtype=torch.bool, device=seq_ids.device)
    any_pair = (klo <= qhi) & (khi >= qlo) & tri.tril()
    full = (qlo == qhi) & (klo == khi) & (qlo == klo) & tri.tril(-1)
    partial = any_pair & ~full

    def ordered(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = sel.sum(-1, dtype=torch.int32)
        order = torch.argsort(~sel, dim=-1, stable=True).to(torch.int32)   # selected blocks first
        return num[:, None], order[:, None]                               # a head dimension of 1

    def mask_mod(bi, _h, q, k):
        return may_attend(padded[bi, q], padded[bi, k], q, k)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(t, t))


# ---- choosing a kernel ----------------------------------------------------------------------

def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=None)
def flash_attn_importable() -> bool:
    """Installed and importable. A wheel built for another torch or CUDA is found by find_spec but
    fails at import: say so once, and let `auto` take the next kernel."""
    if not flash_attn_installed():
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:                              # ImportError, OSError (undefined symbol), ...
        log.warning("flash-attn is installed but cannot be imported (%s: %s); attention uses torch's own "
                    "kernels. Reinstall flash-attn for this torch, or uninstall it.", type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return False
    return True


def torch_varlen_usable(device: torch.device) -> bool:
    """torch's varlen_attn: its flash kernels need CUDA sm80+ (A100, H100, ...)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def choose_impl(attn_impl: str, dtype: torch.dtype, device: torch.device) -> str:
    """Resolve `ModelConfig.attn_impl` for tensors of this dtype/device."""
    if attn_impl not in IMPLS:
        raise ValueError(f"ModelConfig.attn_impl={attn_impl!r} is not one of {IMPLS}")
    half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if attn_impl in ("sdpa", "flex"):
        return attn_impl
    if attn_impl == "flash":
        if not flash_attn_installed():
            raise RuntimeError("ModelConfig.attn_impl='flash' but flash-attn is not installed "
                               "(pip install flash-attn), or set attn_impl to 'auto', 'varlen' or 'flex'")
        if not half:
            raise RuntimeError(f"ModelConfig.attn_impl='flash' needs CUDA fp16/bf16 tensors, got "
                               f"{dtype} on {device.type}; set attn_impl to 'auto' or 'sdpa'")
        if not flash_attn_importable():
            raise RuntimeError("ModelConfig.attn_impl='flash' but flash-attn fails at import (see the "
                               "warning above); reinstall it for this torch or set attn_impl to 'auto'")
        return "flash"
    if attn_impl == "varlen":
        if not (half and torch_varlen_usable(device)):
            raise RuntimeError(f"ModelConfig.attn_impl='varlen' needs CUDA fp16/bf16 tensors on an sm80+ GPU, "
                               f"got {dtype} on {device.type}; set attn_impl to 'auto', 'flex' or 'sdpa'")
        return "varlen"
    if device.type != "cuda":
        return "sdpa"
    if half and torch_varlen_usable(device):
        return "varlen"
    if half and flash_attn_importable():
        return "flash"
    return "flex"


def packed_context(seq_ids: torch.Tensor, impl: str, layout: Optional["PackedLayout"] = None) -> AttentionContext:
    """The context of a packed forward without a KV cache; seq_ids [B, T]. Built once per forward
    and shared by every layer. With the batch's `layout` (evip/model/layout.py), `cu_seqlens`, its
    longest segment and the one-sample-rows test come from it: no host sync."""
    if impl in ("varlen", "flash"):
        if layout is not None:
            return AttentionContext(impl=impl, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen)
        cu = cu_seqlens(seq_ids)
        return AttentionContext(impl=impl, cu_seqlens=cu, max_seqlen=segment_max_len(cu))
    if impl == "flex":
        return AttentionContext(impl="flex", block_mask=flex_block_mask(seq_ids))
    one_sample_rows = layout.one_sample_rows if layout is not None else bool((seq_ids == 0).all())
    if one_sample_rows:                          # one whole sample per row: the causal kernel, no mask
        return AttentionContext(impl="sdpa")
    return AttentionContext(impl="sdpa", mask=dense_mask(seq_ids).unsqueeze(1))


def cached_context(q_len: int, past_len: int, device: torch.device) -> AttentionContext:
    """Decoding one sample with a KV cache: query i (position past_len + i) sees keys <= it."""
    mask = torch.ones(q_len, past_len + q_len, dtype=torch.bool, device=device).tril(past_len)
    return AttentionContext(impl="sdpa", mask=mask[None, None])


# ---- the kernels ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """q [B, H, T, d], k/v [B, Hkv, T, d] -> [B, H, T, d]. Compiled on GPU (eager flex is unfused)."""
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("ModelConfig.attn_impl='flex' cannot train on CPU (torch 2.13 has no flex_attention "
                           "backward there); set attn_impl to 'auto' or 'sdpa'")
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [B, Tq, Hq, d], k/v [B, Tk, Hkv, d] (GQA: Hq multiple of Hkv) -> [B, Tq, Hq * d]."""
    b, tq, hq, d = q.shape
    if ctx.impl in ("varlen", "flash"):
        qf, kf, vf = q.reshape(b * tq, hq, d), k.reshape(-1, k.shape[2], d), v.reshape(-1, v.shape[2], d)
        m = ctx.max_seqlen
        if ctx.impl == "varlen":
            from torch.nn.attention.varlen import varlen_attn
            out = varlen_attn(qf, kf, vf, ctx.cu_seqlens, ctx.cu_seqlens, m, m, window_size=(-1, 0),
                              enable_gqa=hq != k.shape[2])
        else:
            from flash_attn import flash_attn_varlen_func  # lazy: GPU-only dependency
            out = flash_attn_varlen_func(qf, kf, vf, cu_seqlens_q=ctx.cu_seqlens, cu_seqlens_k=ctx.cu_seqlens,
                                         max_seqlen_q=m, max_seqlen_k=m, causal=True)
        return out.reshape(b, tq, hq * d)
    if ctx.impl == "flex":
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.block_mask)
        return out.transpose(1, 2).reshape(b, tq, hq * d)
    if hq != k.shape[2]:
        # Expand the KV heads rather than `enable_gqa`: with a mask, CUDA's memory-efficient
        # kernel takes expanded heads, while enable_gqa would fall back to the O(T^2) math kernel.
        k = k.repeat_interleave(hq // k.shape[2], dim=2)
        v = v.repeat_interleave(hq // v.shape[2], dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx.mask,
        is_causal=ctx.mask is None)
    return out.transpose(1, 2).reshape(b, tq, hq * d)
