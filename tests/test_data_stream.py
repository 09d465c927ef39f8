"""The slot stream: disjoint coverage over (rank, worker) slots, seeded order, epochs, O(1) state."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from data_stream_helpers import make_shards
from evip.data.recipe import SourceConfig
from evip.data.record import BadSample
from evip.data.sources import build_source
from evip.data.stream import SlotStream


def _source(tmp_path, n_shards, per_shard, name="a", **kw):
    keys = make_shards(tmp_path, name, n_shards, per_shard)
    return build_source(SourceConfig(name=name, paths=[str(tmp_path / f"{name}-*.tar")], **kw)), keys


def _epoch(stream: SlotStream, src: int = 0) -> list[str]:
    """The keys a slot reads in its current epoch of source `src` (single-source stream)."""
    c = stream.cursors[src]
    e, out = c.epoch, []
    while True:
        i, rec = stream.next()
        if c.epoch != e:
            return out
        out.append(rec.key.split("/")[-1])


@pytest.mark.parametrize("n_shards,per_shard,slots", [(5, 7, 4), (2, 9, 6), (1, 10, 3), (7, 3, 7)])
def test_every_sample_exactly_once_per_epoch_across_slots(tmp_path, n_shards, per_shard, slots):
    src, keys = _source(tmp_path, n_shards, per_shard)
    seen = Counter()
    sizes = []
    for s in range(slots):
        got = _epoch(SlotStream([src], [1.0], seed=3, slot=s, num_slots=slots))
        sizes.append(len(got))
        seen.update(got)
    assert seen == Counter(keys)              # each key once, none missing
    assert min(sizes) > 0                     # fewer shards than slots: shards split, nobody starves


def test_same_seed_same_order_new_epoch_new_order(tmp_path):
    src, keys = _source(tmp_path, 3, 6)
    a = SlotStream([src], [1.0], seed=7, slot=0, num_slots=1)
    b = SlotStream([src], [1.0], seed=7, slot=0, num_slots=1)
    e0, e0b = _epoch(a), _epoch(b)
    assert e0 == e0b and sorted(e0) == sorted(keys)
    # the record that ended epoch 0 was the first of epoch 1; collect the rest of epoch 1
    assert _epoch(SlotStream([src], [1.0], seed=8, slot=0, num_slots=1)) != e0
    e1 = _epoch(a)
    assert len(e1) == len(keys) - 1 and e1 != e0[1:]   # a fresh order (shards and members)
    assert e0 != sorted(e0)                   # shuffled within and across shards


@pytest.mark.parametrize("fmt", ["tar", "pipe", "jsonl"])
def test_state_restores_to_the_same_next_records_without_replay(tmp_path, fmt):
    src, keys = _source(tmp_path, 4, 25)
    if fmt == "pipe":                         # forward-only shards: file order, skip by reading past
        src = build_source(SourceConfig(name="a", paths=[f"pipe:cat {tmp_path}/a-{{00000..00003}}.tar"]))
    elif fmt == "jsonl":                      # virtual shards of 25 lines
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": k, "text": k}) + "\n" for k in keys))
        src = build_source(SourceConfig(name="a", kind="text", format="jsonl", rows_per_shard=25,
                                        paths=[str(tmp_path / "d.jsonl")]))
    a = SlotStream([src], [1.0], seed=1, slot=1, num_slots=3)
    for _ in range(60):                       # past an epoch boundary (34 samples per slot)
        a.next()
    state = json.loads(json.dumps(a.state_dict()))   # JSON-able and small
    assert len(json.dumps(state)) < 300
    b = SlotStream([src], [1.0], seed=1, slot=1, num_slots=3)
    b.load_state_dict(state)
    assert [a.next()[1].key for _ in range(40)] == [b.next()[1].key for _ in range(40)]
    with pytest.raises(ValueError, match="elastic_state"):
        SlotStream([src], [1.0], seed=1, slot=0, num_slots=3).load_state_dict(state)


def test_truncated_shard_counted_once_where_it_breaks_and_stream_goes_on(tmp_path):
    src, keys = _source(tmp_path, 3, 6)
    path = tmp_path / "a-00001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for slots in (1, 2):
        got, bad = [], []
        for s in range(slots):
            st = SlotStream([src], [1.0], seed=0, slot=s, num_slots=slots)
            c = st.cursors[0]
            while c.epoch == 0:
                _, rec = st.next()
                if c.epoch == 0:
                    (bad if isinstance(rec, BadSample) else got).append(rec)
        assert [b.reason for b in bad] == ["truncated"] and "a-00001.tar" in str(bad[0])
        assert len(got) == 12 + len({r.key for r in got if "a-00001" in r.key})
        assert 0 < sum("a-00001" in r.key for r in got) < 6


def test_unreadable_shard_is_one_bad_sample_and_the_stream_goes_on(tmp_path):
    src, keys = _source(tmp_path, 3, 4)
    (tmp_path / "a-00002.tar").unlink()       # gone after the recipe was validated
    st = SlotStream([src], [1.0], seed=0, slot=0, num_slots=1)
    got, bad = [], []
    while st.cursors[0].epoch == 0:
        _, rec = st.next()
        if st.cursors[0].epoch == 0:
            (bad if isinstance(rec, BadSample) else got).append(rec)
    assert [b.reason for b in bad] == ["unreadable_shard"] and "a-00002.tar" in str(bad[0])
    assert len(got) == 8


def test_too_few_samples_for_the_slots_is_a_clear_error(tmp_path):
    src, _ = _source(tmp_path, 1, 2)          # 2 samples, 4 slots: slots 2 and 3 would never get one
    SlotStream([src], [1.0], seed=0, slot=1, num_slots=4).next()
    with pytest.raises(RuntimeError, match="too few samples for this many ranks x workers"):
        SlotStream([src], [1.0], seed=0, slot=3, num_slots=4).next()
