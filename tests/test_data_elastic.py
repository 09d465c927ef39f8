"""Elastic resume at the stream level: a state taken under S slots continues under S' slots with
no consumed sample repeated and none lost, in-progress shards included (the loader-level 2 -> 1
rank test is in test_data_coverage.py)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from data_stream_helpers import make_shards
from evip.data.recipe import SourceConfig
from evip.data.sources import build_source
from evip.data.stream import SlotStream, elastic_state


def _read(stream, steps, log):
    for _ in range(steps):
        i, rec = stream.next()
        log.append((i, stream.cursors[i].epoch, rec.key))


@pytest.mark.parametrize("old,new,lanes", [(4, 3, (1, 1, 1)), (4, 1, (4, 4, 4)), (2, 5, (3, 1, 2)),
                                           (3, 7, (2, 4, 1)), (1, 1, (4, 2, 3))])
def test_elastic_no_repeat_no_loss(tmp_path, old, new, lanes):
    """Slots old -> new -> 2, each layout reading lanes[i] shards at once per source."""
    names = ["a", "b"]
    keys = {0: make_shards(tmp_path, "a", 5, 9), 1: make_shards(tmp_path, "b", 2, 6)}

    def sources(k):
        return [build_source(SourceConfig(name=n, paths=[str(tmp_path / f"{n}-*.tar")], interleave_shards=k))
                for n in names]

    weights = [2.0, 1.0]
    srcs = sources(lanes[0])
    rng = random.Random(old * 10 + new)
    log: list = []
    states = []
    for s in range(old):                      # uneven progress, some slots past an epoch end
        st = SlotStream(srcs, weights, seed=5, slot=s, num_slots=old)
        _read(st, rng.randrange(0, 40), log)
        states.append(st.state_dict())
    # a second elastic change before the first finished: old -> new -> 2
    mid = []
    srcs = sources(lanes[1])
    for s in range(new):
        st = SlotStream(srcs, weights, seed=5, slot=s, num_slots=new)
        st.load_state_dict(elastic_state(states, s, new, [lanes[1]] * 2))
        _read(st, rng.randrange(0, 15), log)
        mid.append(st.state_dict())
    max_epoch = {i: max(s["sources"][i]["epoch"] for s in states + mid) for i in (0, 1)}
    srcs = sources(lanes[2])
    for s in range(2):
        st = SlotStream(srcs, weights, seed=5, slot=s, num_slots=2)
        st.load_state_dict(elastic_state(mid, s, 2, [lanes[2]] * 2))
        c = st.cursors
        while c[0].epoch <= max_epoch[0] or c[1].epoch <= max_epoch[1]:
            _read(st, 1, log)
    for i in (0, 1):
        for e in range(max_epoch[i] + 1):
            got = Counter(k.split("/")[-1] for j, ep, k in log if j == i and ep == e)
            assert got == Counter(keys[i]), (i, e, got - Counter(keys[i]), Counter(keys[i]) - got)


def test_elastic_needs_every_old_slot(tmp_path):
    make_shards(tmp_path, "a", 2, 3)
    src = build_source(SourceConfig(name="a", paths=[str(tmp_path / "a-*.tar")]))
    states = [SlotStream([src], [1.0], 0, s, 3).state_dict() for s in (0, 2)]
    with pytest.raises(ValueError, match="every old slot"):
        elastic_state(states, 0, 2)
