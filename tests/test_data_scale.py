"""The stream at cluster scale, in this process (bench/data_scale.py runs evip's own stream code
for every (rank, worker) slot over an in-memory source): 64 ranks x 8 workers over 6,250 shards,
a sixteenth of 1,024 x 8 over 100,000 with the same shards per slot (12.2), and a 4:3 rank change
mid-epoch. The full-size
figures (1,024 x 8, 100,000 shards, 1,024 -> 768 ranks) come from `bench/data_scale.py` itself
(README); it takes about 70 s of CPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import data_scale  # noqa: E402

pytestmark = pytest.mark.slow


def test_every_sample_once_per_epoch_and_across_a_rank_change():
    out = data_scale.run(ranks=64, workers=8, shards=6_250, new_ranks=48)
    epoch, elastic = out["epoch"], out["elastic"]
    assert epoch["every_sample_once"]
    assert epoch["shards_per_slot"]["max"] - epoch["shards_per_slot"]["min"] <= 1   # shards dealt evenly
    assert elastic["every_sample_once"] and elastic["repeated"] == 0 and elastic["lost"] == 0
    assert 0 < elastic["read_before"] < out["samples"]                   # the change came mid-epoch
    assert out["state_bytes_per_worker"] < 300
    # after the change a worker keeps only the old cursors owning its own positions (not all 512)
    assert elastic["state_bytes_handed_to_worker"] > 30 * 64 * 8
    assert elastic["state_bytes_per_worker_after"] < 2_000
