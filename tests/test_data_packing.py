"""Packing: whole samples, restarting positions, seq/kind ids, pixel order, efficiency, resume."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evip.batch import IGNORE_INDEX, TENSOR_KEYS
from evip.data.packing import Packer
from evip.data.record import BadSample, Sample

S = 8   # tile side


def make_sample(i: int, length: int, tiles: int = 0, kind: int = 0) -> Sample:
    """Sample i: ids 1000*i + t (recognisable), labels = ids, each tile filled with i + tile/100."""
    ids = torch.arange(length) + 1000 * (i + 1)
    pix = torch.stack([torch.full((3, S, S), i + k / 100) for k in range(tiles)]) if tiles else torch.zeros(0, 3, S, S)
    return Sample(input_ids=ids, labels=ids.clone(), kind_id=kind, pixel_values=pix, key=f"k{i}")


def run(packer: Packer, samples: list[Sample]) -> list[dict]:
    out = []
    for pos, s in enumerate(samples):
        out += packer.add(s, position=pos)
    return out


def unpack(batch: dict) -> list[list[tuple[torch.Tensor, int]]]:
    """Per row: (ids, kind) of each sample found by its seq_id run."""
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        seq = batch["seq_ids"][b]
        found = []
        for sid in range(int(seq.max()) + 1):
            idx = (seq == sid).nonzero().flatten()
            assert torch.equal(idx, torch.arange(idx[0], idx[-1] + 1)), "a sample must be contiguous"
            assert torch.equal(batch["position_ids"][b, idx], torch.arange(len(idx)))
            found.append((batch["input_ids"][b, idx], int(batch["kind_ids"][b, idx[0]])))
        rows.append(found)
    return rows


def test_batch_layout_positions_seq_kinds_pixels():
    samples = [make_sample(0, 5, tiles=2, kind=0), make_sample(1, 4, tiles=0, kind=2),
               make_sample(2, 6, tiles=1, kind=1), make_sample(3, 9, tiles=1, kind=0)]
    packer = Packer(token_budget=10, max_images_per_pack=8, pad_id=7, rows=2)
    batches = run(packer, samples)
    assert len(batches) == 1                                 # sample 3 fits no row: opens the next batch
    batch = batches[0]
    assert tuple(batch) == TENSOR_KEYS and batch["input_ids"].shape == (2, 10)
    # first-fit: row 0 holds samples 0 and 1 (9 tokens), row 1 holds sample 2
    rows = unpack(batch)
    assert [[ids[0].item() // 1000 - 1 for ids, _ in r] for r in rows] == [[0, 1], [2]]
    assert [[k for _, k in r] for r in rows] == [[0, 2], [1]]
    for (ids, _), s in zip(rows[0] + rows[1], [samples[0], samples[1], samples[2]]):
        assert torch.equal(ids, s.input_ids)                 # whole samples, never cut
    pad = batch["seq_ids"] == -1
    assert pad.sum() == 20 - 15 and (batch["input_ids"][pad] == 7).all() and (batch["kind_ids"][pad] == -1).all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    # labels equal ids except each sample's first token (no target inside its own sample)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts & ~pad] == IGNORE_INDEX).all()
    keep = ~starts & ~pad
    assert torch.equal(batch["labels"][keep], batch["input_ids"][keep])
    # pixels row-major over B then T: sample 0's two tiles, then sample 2's
    assert batch["pixel_values"].shape == (3, 3, S, S)
    assert [round(batch["pixel_values"][n, 0, 0, 0].item(), 2) for n in range(3)] == [0.0, 0.01, 2.0]
    assert packer.stats.efficiency == pytest.approx(15 / 20)
    assert packer.pending() == 1 and packer.resume_from() == 3


def test_text_only_batch_has_empty_pixels():
    packer = Packer(token_budget=8, max_images_per_pack=4, pad_id=0)
    batch = run(packer, [make_sample(0, 5), make_sample(1, 5)])[0]
    assert batch["pixel_values"].shape == (0, 3, S, S)


def test_tile_cap_closes_a_batch_and_oversized_samples_are_refused():
    packer = Packer(token_budget=100, max_images_per_pack=3, pad_id=0)
    out = run(packer, [make_sample(0, 5, tiles=2), make_sample(1, 5, tiles=2)])
    assert len(out) == 1 and out[0]["pixel_values"].shape[0] == 2   # 2 + 2 > 3: new batch
    state = packer.state_dict()
    with pytest.raises(BadSample) as e:
        packer.add(make_sample(2, 101))
    assert e.value.reason == "too_long"
    with pytest.raises(BadSample) as e:
        packer.add(make_sample(3, 5, tiles=4))
    assert e.value.reason == "too_many_images"
    assert packer.state_dict() == state                          # refused samples leave no trace


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 32), min_size=1, max_size=60), rows=st.integers(1, 3),
       budget=st.integers(32, 64))
def test_every_sample_packed_once_whole_and_in_order(lengths, rows, budget):
    samples = [make_sample(i, n, tiles=i % 3) for i, n in enumerate(lengths)]
    packer = Packer(token_budget=budget, max_images_per_pack=6, pad_id=0, rows=rows)
    batches = run(packer, samples) + packer.flush()
    seen = []
    for batch in batches:
        assert batch["input_ids"].shape == (rows, budget)
        per_row = unpack(batch)
        ids_in_batch = sorted(int(ids[0]) // 1000 - 1 for r in per_row for ids, _ in r)
        seen += ids_in_batch
        n_ctx = sum(samples[i].pixel_values.shape[0] for i in ids_in_batch)
        assert batch["pixel_values"].shape[0] == n_ctx <= 6
    assert seen == list(range(len(samples)))                     # each once, batches in stream order
    real = sum(lengths)
    assert packer.stats.real_tokens == real and packer.stats.samples == len(samples)
    assert packer.stats.efficiency == pytest.approx(real / (len(batches) * rows * budget))


def test_resume_from_positions_gives_identical_batches():
    samples = [make_sample(i, 3 + (i * 7) % 11, tiles=i % 2) for i in range(40)]
    ref = Packer(token_budget=24, max_images_per_pack=4, pad_id=0, rows=2)
    expected, states = [], {}
    for pos, s in enumerate(samples):
        for b in ref.add(s, position=pos):
            expected.append(b)
            states[len(expected)] = ref.state_dict()
    k = 3
    state = states[k]
    assert all(isinstance(p, int) for p in state["pending_positions"])   # positions only, no tensors
    resumed = Packer(token_budget=24, max_images_per_pack=4, pad_id=0, rows=2)
    pending = resumed.load_state_dict(state)
    assert pending == list(range(pending[0], pending[0] + len(pending)))  # a contiguous run
    out = []
    for pos in range(pending[0], len(samples)):                  # rewind the stream to the oldest pending
        out += resumed.add(samples[pos], position=pos)
    assert len(out) == len(expected) - k
    for a, b in zip(out, expected[k:]):
        for key in TENSOR_KEYS:
            assert torch.equal(a[key], b[key]), key
    assert resumed.stats == ref.stats
    with pytest.raises(ValueError, match="token_budget"):
        Packer(token_budget=32, max_images_per_pack=4, pad_id=0, rows=2).load_state_dict(state)


def test_uint8_pixels_stay_uint8_and_a_dtype_mix_is_refused():
    def u8(i: int, tiles: int) -> Sample:
        ids = torch.arange(4) + 1000 * (i + 1)
        pix = torch.full((tiles, 3, S, S), 10 * i, dtype=torch.uint8)
        return Sample(input_ids=ids, labels=ids.clone(), kind_id=0, pixel_values=pix, key=f"u{i}")
    packer = Packer(token_budget=8, max_images_per_pack=0, pad_id=0)
    batch = run(packer, [u8(1, 2), u8(2, 0), u8(3, 1)])[0]            # the third opens the next batch
    assert batch["pixel_values"].dtype == torch.uint8
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [10, 10]
    assert packer.flush()[0]["pixel_values"].tolist() == torch.full((1, 3, S, S), 30).tolist()
    text_only = Packer(token_budget=8, max_images_per_pack=0, pad_id=0)
    assert run(text_only, [u8(4, 0)]) == [] and text_only.flush()[0]["pixel_values"].dtype == torch.uint8
    mixed = Packer(token_budget=16, max_images_per_pack=0, pad_id=0)
    run(mixed, [u8(5, 1), make_sample(6, 4, tiles=1)])
    with pytest.raises(ValueError, match="uint8"):
        mixed.flush()
