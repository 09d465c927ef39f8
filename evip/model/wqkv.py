"""InternLM2's packed `wqkv`: q, k and v rows interleaved per KV group.

Rows are ordered as (kv_heads, q_per_kv + 2, head_dim): for each KV head, its `q_per_kv` query
heads, then its key head, then its value head. Query head j belongs to KV head j // q_per_kv, the
grouping of HF Llama's `repeat_kv`, so unpacked q/k/v drop straight into a Llama-style attention.
Works for weights [rows, in] and biases [rows].
"""
from __future__ import annotations

import torch


def _groups(num_heads: int, num_kv_heads: int) -> int:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    return num_heads // num_kv_heads


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """[q; k; v] in Llama layout -> InternLM2 `wqkv` rows (kv_heads, q_per_kv + 2, head_dim)."""
    g = _groups(num_heads, num_kv_heads)
    tail = q.shape[1:]
    qg = q.reshape(num_kv_heads, g, head_dim, *tail)
    kg = k.reshape(num_kv_heads, 1, head_dim, *tail)
    vg = v.reshape(num_kv_heads, 1, head_dim, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(num_kv_heads * (g + 2) * head_dim, *tail)


def unpack_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2 `wqkv` -> (q, k, v) in Llama layout; each a fresh contiguous tensor."""
    g = _groups(num_heads, num_kv_heads)
    rows = num_kv_heads * (g + 2) * head_dim
    if wqkv.shape[0] != rows:
        raise ValueError(f"wqkv has {wqkv.shape[0]} rows, expected {rows} = kv_heads {num_kv_heads} x "
                         f"(q_per_kv {g} + 2) x head_dim {head_dim}")
    tail = wqkv.shape[1:]
    w = wqkv.reshape(num_kv_heads, g + 2, head_dim, *tail)
    q = w[:, :g].reshape(num_heads * head_dim, *tail).clone()
    k = w[:, g].reshape(num_kv_heads * head_dim, *tail).clone()
    v = w[:, g + 1].reshape(num_kv_heads * head_dim, *tail).clone()
    return q, k, v
