"""The slot stream: disjoint coverage over (rank, worker) slots, seeded order, epochs, O(1) state."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from data_stream_helpers import make_shards, write_shard
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


@pytest.mark.parametrize("lanes", [1, 3])
@pytest.mark.parametrize("n_shards,per_shard,slots", [(5, 7, 4), (2, 9, 6), (1, 10, 3), (7, 3, 7), (11, 4, 2)])
def test_every_sample_exactly_once_per_epoch_across_slots(tmp_path, n_shards, per_shard, slots, lanes):
    src, keys = _source(tmp_path, n_shards, per_shard, interleave_shards=lanes)
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


def _shard_of(rec) -> int:
    return int(rec.key.split("_")[-1]) // 10          # make_shards(..., per_shard=10)


def test_lanes_interleave_shards_record_by_record(tmp_path):
    src, _ = _source(tmp_path, 8, 10, interleave_shards=4)
    st = SlotStream([src], [1.0], seed=2, slot=0, num_slots=1)
    shards = [_shard_of(st.next()[1]) for _ in range(80)]
    for g in (0, 1):                          # two groups of 4 shards, read in turn: 0 1 2 3 0 1 2 3 ...
        group = shards[40 * g: 40 * g + 40]
        assert len(set(group[:4])) == 4 and group == group[:4] * 10
    assert set(shards[:40]).isdisjoint(shards[40:])
    one = SlotStream([build_source(SourceConfig(name="a", paths=[str(tmp_path / "a-*.tar")], interleave_shards=1))],
                     [1.0], seed=2, slot=0, num_slots=1)
    assert len({_shard_of(one.next()[1]) for _ in range(10)}) == 1   # 1 lane: one shard after another


@pytest.mark.parametrize("fmt", ["tar", "pipe"])
def test_resume_at_every_step_continues_the_same_stream(tmp_path, fmt):
    """Uneven shards (one truncated, one gone, so lanes end at different times), 3 lanes, 2
    epochs: restoring the state taken after any step gives exactly the rest of the stream, and a
    shard's end is counted once however often the run is resumed around it."""
    for s, n in enumerate((7, 3, 9, 5, 6)):
        write_shard(tmp_path / f"a-{s:05d}.tar", [f"a_{s * 10 + j:05d}" for j in range(n)])
    truncated = tmp_path / "a-00002.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    paths = [str(tmp_path / "a-*.tar")] if fmt == "tar" else [f"pipe:cat {tmp_path}/a-{{00000..00004}}.tar"]
    src = build_source(SourceConfig(name="a", paths=paths, interleave_shards=3))
    (tmp_path / "a-00004.tar").unlink()       # gone after the recipe was validated

    def label(rec):
        return f"bad:{rec.reason}" if isinstance(rec, BadSample) else rec.key.split("/")[-1]

    full = SlotStream([src], [1.0], seed=4, slot=0, num_slots=1)
    states, out = [], []
    while full.cursors[0].epoch < 2:
        states.append(json.loads(json.dumps(full.state_dict())))
        out.append(label(full.next()[1]))
    assert out.count("bad:truncated") == out.count("bad:unreadable_shard") == 2     # once per epoch
    for t in range(len(out)):
        resumed = SlotStream([src], [1.0], seed=4, slot=0, num_slots=1)
        resumed.load_state_dict(states[t])
        assert [label(resumed.next()[1]) for _ in range(len(out) - t)] == out[t:], t


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
