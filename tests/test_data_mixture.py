"""Mixture: weighted source choice, proportions within the stated tolerance, O(1) state."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from data_stream_helpers import make_shards
from evip.data.mixture import Mixture
from evip.data.recipe import SourceConfig
from evip.data.sources import build_source
from evip.data.stream import SlotStream


def test_proportions_within_four_sigma_over_windows():
    weights = [5.0, 3.0, 2.0]
    p = np.array(weights) / sum(weights)
    for seed in range(3):
        for stream_id in range(3):
            m = Mixture(weights, seed, stream_id)
            for window in (1000, 5000):
                draws = Counter(m.next() for _ in range(window))
                for i, pi in enumerate(p):
                    tol = 4 * math.sqrt(pi * (1 - pi) / window)
                    assert abs(draws[i] / window - pi) <= tol, (seed, stream_id, window, i)


def test_state_is_the_draw_count():
    a = Mixture([1, 2], seed=4)
    for _ in range(5000):
        a.next()
    b = Mixture([1, 2], seed=4)
    b.load_state_dict(a.state_dict())
    assert a.state_dict() == {"n": 5000}
    assert [a.next() for _ in range(100)] == [b.next() for _ in range(100)]


def test_stream_realises_the_mixture_across_source_epochs(tmp_path):
    """Sources of very different sizes: the small one cycles epochs, proportions still hold."""
    make_shards(tmp_path, "big", 2, 50)
    make_shards(tmp_path, "small", 1, 4)
    srcs = [build_source(SourceConfig(name=n, paths=[str(tmp_path / f"{n}-*.tar")])) for n in ("big", "small")]
    st = SlotStream(srcs, [3.0, 1.0], seed=0, slot=0, num_slots=1)
    n = 2000
    got = Counter(st.next()[1].source for _ in range(n))
    assert abs(got["small"] / n - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / n)
    assert st.cursors[1].epoch >= 100          # the small source cycled, the stream never ended
