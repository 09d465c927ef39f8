"""Coverage through the real loader (worker processes, packing, the real tokenizer): over one epoch
every sample is seen exactly once across ranks x workers; an elastic 2 -> 1 rank resume neither
repeats nor loses a consumed sample.

Keys are read back from the packed batches (captions are `caption <key>`). StatefulDataLoader hands
out batches round-robin over its workers, so batch i of a rank comes from worker i % W. Packing
keeps arrival order across batches (rows may reorder samples *within* a batch)."""
from __future__ import annotations

from collections import Counter

import pytest

from data_stream_helpers import (batch_keys, data_config, make_shards, model_config_for, real_tokenizer,
                                 write_recipe)
from evip.data.loader import build_loader
from evip.data.recipe import load_recipe
from evip.data.sources import build_source
from evip.data.stream import SlotStream


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("coverage")
    keys = make_shards(d, "a", 3, 9)          # 3 shards < 4 slots: shards are split between slots
    recipe = write_recipe(d / "r.yaml", [{"name": "a", "paths": [str(d / "a-*.tar")]}])
    big_keys = make_shards(d, "e", 4, 30)     # ~30 samples per slot: the old run stays in epoch 0
    big = write_recipe(d / "big.yaml", [{"name": "e", "paths": [str(d / "e-*.tar")]}])
    tok = real_tokenizer()
    return {"keys": keys, "recipe": recipe, "big_keys": big_keys, "big": big, "tok": tok,
            "model_cfg": model_config_for(tok)}


def _slot_epoch0(recipe, slot, num_slots, seed=0):
    src = build_source(load_recipe(recipe).sources[0])
    st = SlotStream([src], [1.0], seed, slot, num_slots)
    out = []
    while True:
        _, rec = st.next()
        if st.cursors[0].epoch > 0:
            return out
        out.append(rec.key.split("/")[-1])


def test_one_epoch_every_sample_exactly_once_across_ranks_and_workers(setup):
    cfg = data_config(setup["recipe"], num_workers=2)
    epoch0 = Counter()
    for rank in range(2):
        loader = build_loader(cfg, setup["tok"], setup["model_cfg"], rank, 2)
        expected = [_slot_epoch0(setup["recipe"], rank * 2 + w, 4) for w in range(2)]
        got: list[list[list[str]]] = [[], []]
        it = iter(loader)
        while any(sum(map(len, got[w])) < len(expected[w]) for w in range(2)):
            i = sum(map(len, got))
            got[i % 2].append(batch_keys(next(it), setup["tok"]))
        for w in range(2):
            flat = [k for b in got[w] for k in b]
            n = len(expected[w])
            # whole batches before the one that crosses the epoch end hold epoch-0 samples only
            before = [k for b in got[w][:-1] for k in b]
            assert len(before) < n <= len(flat)
            assert Counter(before) <= Counter(expected[w]) and len(set(before)) == len(before)
            rest = Counter(expected[w]) - Counter(before)
            assert rest <= Counter(got[w][-1])
            epoch0 += Counter(expected[w])
        assert loader.stats()["samples"]["a"] >= sum(len(e) for e in expected)
        del it
    assert epoch0 == Counter(setup["keys"])   # every key once over 2 ranks x 2 workers


@pytest.mark.parametrize("old_ranks,old_workers,new_workers,new_lanes", [(2, 2, 1, 4), (1, 1, 1, 1)],
                         ids=["2x2_to_1x1", "interleave_4_to_1"])
def test_elastic_resume_no_repeat_no_loss(setup, old_ranks, old_workers, new_workers, new_lanes):
    """Old run: ranks x workers reading 4 shards at once (the default); rank r consumed 2 + r
    batches. New run: 1 rank, a new layout (fewer ranks and workers, or reading 1 shard at a
    time), restored from all old ranks' states. Promise (no caveat): the new run's first N - C
    samples (C consumed before) are exactly the keys not consumed, each once. Samples the old
    packers held back (read but not yet in a returned batch) were not consumed: they are re-read."""
    tok, mc = setup["tok"], setup["model_cfg"]
    consumed, states = Counter(), []
    for rank in range(old_ranks):
        loader = build_loader(data_config(setup["big"], num_workers=old_workers), tok, mc, rank, old_ranks)
        it = iter(loader)
        for _ in range(2 + rank):
            consumed.update(batch_keys(next(it), tok))
        states.append(loader.state_dict())
        del it
    assert max(consumed.values()) == 1
    cfg = data_config(setup["big"], num_workers=new_workers,
                      recipe_overrides=[f"sources.0.interleave_shards={new_lanes}"])
    new = build_loader(cfg, tok, mc, 0, 1)
    new.load_state_dict(states)
    remaining = Counter(setup["big_keys"]) - consumed
    n_left = sum(remaining.values())
    assert 0 < n_left < len(setup["big_keys"])
    batches, seen = [], 0
    it = iter(new)
    while seen < n_left:
        batches.append(batch_keys(next(it), tok))
        seen += len(batches[-1])
    before = Counter(k for b in batches[:-1] for k in b)
    assert before <= remaining                # nothing consumed before comes back, no repeats
    assert remaining - before <= Counter(batches[-1])   # and nothing is lost
    assert new.stats()["samples"]["e"] >= len(consumed) + n_left
