"""Weighted choice of the next source: a counter-based seeded draw, so its state is one integer.

Draw n of stream `stream_id` is a pure function of (seed, stream_id, n): uniforms come in blocks
of BLOCK from `numpy.random.default_rng([seed, stream_id, n // BLOCK])`. Restoring the state is
setting `n`; nothing is replayed.

Tolerance (what tests/test_data_mixture.py checks): the draws are i.i.d. categorical with
p_i = w_i / sum(w), so over a window of N draws the realised fraction of source i stays within
4 * sqrt(p_i (1 - p_i) / N) of p_i (a 4-sigma band; e.g. +-0.018 for p=0.5, N=5000).
"""
from __future__ import annotations

import numpy as np

BLOCK = 4096


class Mixture:
    def __init__(self, weights: list[float], seed: int, stream_id: int = 0):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or not np.all(w > 0):
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        self.cdf = np.cumsum(w / w.sum())
        self.cdf[-1] = 1.0
        self.seed, self.stream_id = int(seed), int(stream_id)
        self.n = 0
        self._block = (-1, None)

    def _uniform(self, n: int) -> float:
        b = n // BLOCK
        if self._block[0] != b:
            self._block = (b, np.random.default_rng([self.seed, self.stream_id, b]).random(BLOCK))
        return float(self._block[1][n % BLOCK])

    def peek(self) -> int:
        """The source of the next draw, without consuming it."""
        if len(self.cdf) == 1:
            return 0
        u = self._uniform(self.n)
        i = int(np.searchsorted(self.cdf, u, side="right"))
        return min(i, len(self.cdf) - 1)

    def next(self) -> int:
        i = self.peek()
        self.n += 1
        return i

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])
