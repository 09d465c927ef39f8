"""A pre-allocated key/value cache for incremental decoding."""
from __future__ import annotations

import copy

import torch


class KVCache:
    """Keys and values of every layer, [B, kv_heads, max_len, head_dim] each.

    Layers call `update(layer, k, v)` with the new tokens' keys/values; after the whole forward the
    caller calls `advance(n)`. `length` is the number of cached positions.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, max_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, n, kv_heads, d] after the cached positions; return all keys/values so far."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def repeat(self, batch: int) -> "KVCache":
        """A cache of `batch` rows, each starting with this one-row cache's positions: several
        continuations of one shared prompt, decoded side by side (one read of the weights)."""
        if self.batch != 1:
            raise ValueError(f"repeat() copies a one-row cache, this one has {self.batch} rows")
        return self.rows(torch.zeros(batch, dtype=torch.long, device=self.k[0].device))

    def rows(self, index: torch.Tensor) -> "KVCache":
        """A cache whose row j is a copy of this cache's row `index[j]`: continuations of several
        cached prompts, each repeated for its own candidates, decoded side by side."""
        out = copy.copy(self)
        out.k = [k.index_select(0, index) for k in self.k]
        out.v = [v.index_select(0, index) for v in self.v]
        return out
