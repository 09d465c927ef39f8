"""The packed-attention kernels against the one mask definition (packed_attention.may_attend):
cu_seqlens (varlen, flash-attn) as data, flex_attention's block mask == the SDPA reference, the
kernel choice under `auto` (a broken flash-attn falls back with one log line).

What CPU cannot show: torch 2.13 has no flex_attention backward and no varlen_attn on CPU, so the
gradients of flex and varlen against the reference are compared by bench/gpu_check.sh on a GPU."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from evip.model import packed_attention as pa
from evip.model.packed_attention import attend, choose_impl, cu_seqlens, dense_mask, flex_block_mask, packed_context


def _rows(lengths_per_row: list[list[int]], t: int) -> torch.Tensor:
    """seq_ids [B, t]: each row's samples as contiguous runs 0, 1, ..., then padding -1."""
    out = torch.full((len(lengths_per_row), t), -1)
    for r, lengths in enumerate(lengths_per_row):
        pos = 0
        for i, n in enumerate(lengths):
            out[r, pos:pos + n] = i
            pos += n
    return out


def test_cu_seqlens_start_a_segment_at_every_row():
    assert cu_seqlens(torch.tensor([[0, 0], [0, 0]])).tolist() == [0, 2, 4]      # not [0, 4]
    assert cu_seqlens(torch.tensor([[0, 1, -1], [0, 0, 0]])).tolist() == [0, 1, 2, 3, 6]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=1, max_size=3), st.integers(0, 5))
def test_cu_seqlens_segments_are_the_mask(lengths, pad):
    t = max(sum(r) for r in lengths) + pad
    seq = _rows(lengths, t)
    cu = cu_seqlens(seq).tolist()
    assert cu[0] == 0 and cu[-1] == seq.numel() and cu == sorted(set(cu))
    from_segments = torch.zeros(seq.numel(), seq.numel(), dtype=torch.bool)
    for s, e in zip(cu[:-1], cu[1:]):
        from_segments[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    assert torch.equal(torch.block_diag(*dense_mask(seq)), from_segments)


LAYOUTS = {
    "samples_and_padding": ([[300, 60], [128, 100, 100, 50]], 400),     # full, partial and skipped blocks
    "one_sample_a_row": ([[200], [200]], 200),
    "ragged_end": ([[7, 3], [1, 1, 1]], 13),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_flex_block_mask_equals_the_sdpa_reference(layout, heads):
    lengths, t = LAYOUTS[layout]
    seq = _rows(lengths, t)
    g = torch.Generator().manual_seed(0)
    hq, hkv = heads
    q, k, v = (torch.randn(len(lengths), t, h, 16, generator=g) for h in (hq, hkv, hkv))
    ref = attend(q, k, v, packed_context(seq, "sdpa"))
    torch.testing.assert_close(attend(q, k, v, packed_context(seq, "flex")), ref)


def test_flex_block_mask_is_exact_for_any_layout():
    """Samples not in contiguous runs (not what the packer writes): blocks are only skipped or
    taken whole when that is right, so flex still equals the reference."""
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(-1, 3, (2, 300), generator=g)
    seq[:, 128:256] = 2                                        # a one-sample block among mixed ones
    q, k, v = (torch.randn(2, 300, 2, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v, packed_context(seq, "flex")), attend(q, k, v, packed_context(seq, "sdpa")))


def _block_sets(bm, b: int, i: int) -> tuple[set, set]:
    """(partial, full) key blocks of query block i in row b."""
    part = set(bm.kv_indices[b, 0, i, :bm.kv_num_blocks[b, 0, i]].tolist())
    full = set(bm.full_kv_indices[b, 0, i, :bm.full_kv_num_blocks[b, 0, i]].tolist())
    return part, full


@pytest.mark.parametrize("layout", ["samples_and_padding", "one_sample_a_row", "ragged_end", "any"])
def test_flex_blocks_are_exactly_the_masks_blocks(layout):
    """Every block holding an allowed pair is visited (for the packer's runs only those), and only
    blocks where every pair is allowed skip the mask (CPU's eager flex evaluates the mask everywhere, so this checks the blocks GPU
    kernels rely on)."""
    if layout == "any":        # samples not in runs (not what the packer writes)
        seq = torch.randint(-1, 3, (2, 500), generator=torch.Generator().manual_seed(1))
        seq[:, 128:384] = 2
    else:
        seq = _rows(*LAYOUTS[layout])
    bm, dense, blk = flex_block_mask(seq), dense_mask(seq), pa.FLEX_BLOCK
    n = -(-seq.shape[1] // blk)
    for b in range(seq.shape[0]):
        for i in range(n):
            part, full = _block_sets(bm, b, i)
            assert not part & full
            for j in range(n):
                pairs = dense[b, i * blk:(i + 1) * blk, j * blk:(j + 1) * blk]
                whole = pairs.shape == (blk, blk) and bool(pairs.all())
                if pairs.any():
                    assert j in part | full, (b, i, j)
                elif layout != "any":        # the packer's runs: no block visited in vain
                    assert j not in part | full, (b, i, j)
                assert j not in full or whole, (b, i, j)


def test_flex_skips_blocks_across_samples():
    bm = flex_block_mask(_rows([[256] * 4], 1024))         # 4 samples of 2 blocks: 4 x 3 of 64, not 36 (causal)
    assert bm.sparsity() == pytest.approx(100 * (1 - 12 / 64))


def test_model_with_images_flex_equals_sdpa(tiny_cfg):
    from dataclasses import replace

    from evip.model.mono import MonoInternVL
    from trainer_helpers import GeneratedBatches

    batch = GeneratedBatches(tiny_cfg, 0, 0, seq_len=40).batch(0)    # an image + caption, a text sample
    outs = []
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = MonoInternVL(replace(tiny_cfg, attn_impl=impl, visual_attention_experts=True)).eval()
        with torch.no_grad():
            outs.append(model(**batch))
    torch.testing.assert_close(outs[1].logits, outs[0].logits)
    torch.testing.assert_close(outs[1].loss, outs[0].loss)


def test_flex_training_on_cpu_names_the_setting():
    q = torch.randn(1, 8, 2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="attn_impl='flex' cannot train on CPU"):
        attend(q, q, q, packed_context(torch.zeros(1, 8, dtype=torch.long), "flex"))


def test_auto_picks_by_device():
    cuda = torch.device("cuda")
    assert choose_impl("auto", torch.bfloat16, torch.device("cpu")) == "sdpa"
    assert choose_impl("auto", torch.float32, cuda) == "flex"          # no torch varlen, no flash-attn here
    with pytest.raises(RuntimeError, match="attn_impl='varlen' needs CUDA fp16/bf16"):
        choose_impl("varlen", torch.float32, cuda)


def test_broken_flash_attn_falls_back_with_one_log_line(tmp_path, monkeypatch, caplog):
    """A flash-attn wheel built for another torch: found by find_spec, fails at import."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    pa.flash_attn_importable.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=pa.__name__):
            picks = [choose_impl("auto", torch.bfloat16, torch.device("cuda")) for _ in range(3)]
        assert picks == ["flex"] * 3
        lines = [r.getMessage() for r in caplog.records if r.name == pa.__name__]
        assert len(lines) == 1 and "flash-attn is installed but cannot be imported" in lines[0]
        assert "undefined symbol" in lines[0]
        with pytest.raises(RuntimeError, match="flash-attn fails at import"):
            choose_impl("flash", torch.bfloat16, torch.device("cuda"))
    finally:
        pa.flash_attn_importable.cache_clear()
