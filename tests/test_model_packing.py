"""Packed rows: each sample behaves as if alone; nothing crosses a sample boundary."""
from __future__ import annotations

import torch

from evip.batch import IGNORE_INDEX
from evip.model.mono import MonoInternVL
from evip.model.packed_attention import AttentionContext, attend, packed_context
from tests.conftest import tiny_model_config

CFG = tiny_model_config(visual_attention_experts=True)
IMG = CFG.img_context_token_id
TPT = CFG.tokens_per_tile


def _sample(length, n_tiles=0, seed=0, kind=2):
    """One sample: [text, IMG_CONTEXT * tokens, text]; labels on the text after the image."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (length,), generator=g)
    if n_tiles:
        ids[1:1 + n_tiles * TPT] = IMG
    labels = ids.clone()
    labels[ids == IMG] = IGNORE_INDEX
    labels[0] = IGNORE_INDEX
    pixels = torch.randn(n_tiles, 3, CFG.image_size, CFG.image_size, generator=g)
    return dict(ids=ids, labels=labels, pixels=pixels, kind=kind)


def _pack(rows, length):
    """rows: list of lists of samples -> batch dict as in evip/batch.py (padding at row ends)."""
    b = len(rows)
    batch = dict(input_ids=torch.full((b, length), CFG.pad_token_id),
                 labels=torch.full((b, length), IGNORE_INDEX), position_ids=torch.zeros(b, length, dtype=torch.long),
                 seq_ids=torch.full((b, length), -1), kind_ids=torch.full((b, length), -1))
    pixels = []
    for r, samples in enumerate(rows):
        at = 0
        for i, s in enumerate(samples):
            n = len(s["ids"])
            batch["input_ids"][r, at:at + n] = s["ids"]
            batch["labels"][r, at:at + n] = s["labels"]
            batch["position_ids"][r, at:at + n] = torch.arange(n)
            batch["seq_ids"][r, at:at + n] = i
            batch["kind_ids"][r, at:at + n] = s["kind"]
            s["span"] = (r, at, at + n)
            pixels.append(s["pixels"])
            at += n
    batch["pixel_values"] = torch.cat(pixels)
    return batch


def _alone(model, s):
    return model(s["ids"][None], pixel_values=s["pixels"], labels=s["labels"][None])


def _model():
    torch.manual_seed(0)
    return MonoInternVL(CFG).eval()


def test_packed_rows_equal_samples_run_alone():
    model = _model()
    a, b, c, d = _sample(9, 1, seed=1, kind=0), _sample(7, 0, seed=2, kind=2), \
        _sample(12, 2, seed=3, kind=1), _sample(6, 1, seed=4, kind=0)
    batch = _pack([[a, b], [c, d]], 20)
    with torch.no_grad():
        packed = model(**batch)
        for s in (a, b, c, d):
            alone = _alone(model, s)
            r, start, end = s["span"]
            torch.testing.assert_close(packed.logits[r, start:end], alone.logits[0], rtol=1e-4, atol=1e-5)
            s["loss_sum"], s["num"] = alone.loss_sum, alone.num_tokens
    total = sum(s["loss_sum"] for s in (a, b, c, d))
    torch.testing.assert_close(packed.loss_sum, total, rtol=1e-5, atol=1e-5)
    assert int(packed.num_tokens) == sum(int(s["num"]) for s in (a, b, c, d))
    torch.testing.assert_close(packed.loss, total / packed.num_tokens)
    # per-kind sums: caption = a + d, chat = c, text = b
    torch.testing.assert_close(packed.kind_loss_sum,
                               torch.stack([a["loss_sum"] + d["loss_sum"], c["loss_sum"], b["loss_sum"]]),
                               rtol=1e-5, atol=1e-5)
    assert packed.kind_num_tokens.tolist() == [int(a["num"] + d["num"]), int(c["num"]), int(b["num"])]


def test_no_attention_across_samples_or_from_padding():
    model = _model()
    a, b = _sample(8, 1, seed=5), _sample(8, 1, seed=6)
    batch = _pack([[a, b]], 20)
    with torch.no_grad():
        base = model(**batch).logits
        changed = {k: v.clone() for k, v in batch.items()}
        changed["input_ids"][0, 0] = 99                   # perturb sample A's text ...
        changed["input_ids"][0, 6:8] = 55
        changed["pixel_values"][0] += 1.0                 # ... and its image
        changed["input_ids"][0, 16:] = 77                 # and the padding
        out = model(**changed).logits
    assert not torch.allclose(out[0, :8], base[0, :8])    # A did change
    torch.testing.assert_close(out[0, 8:16], base[0, 8:16], rtol=0, atol=0)   # B did not
    assert torch.isfinite(out).all()                      # padding rows: no NaN


def test_loss_shift_never_crosses_a_sample():
    """A's last position is not trained to predict B's first token."""
    model = _model()
    a, b = _sample(6, 0, seed=7), _sample(6, 0, seed=8)
    a["labels"][:] = a["ids"]
    b["labels"][:] = b["ids"]
    batch = _pack([[a, b]], 14)
    with torch.no_grad():
        out = model(**batch)
    assert int(out.num_tokens) == 5 + 5


def test_no_labels_gives_zero_loss_not_nan():
    model = _model()
    s = _sample(6, 0)
    out = model(s["ids"][None], labels=torch.full((1, 6), IGNORE_INDEX))
    assert out.loss.item() == 0.0 and int(out.num_tokens) == 0


def test_flash_segments_match_the_sdpa_block_mask():
    """cu_seqlens (flash-attn varlen) describe exactly the blocks the sdpa mask allows."""
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    flash = packed_context(seq_ids, "flash")
    assert flash.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12] and flash.max_seqlen == 4
    assert flash.cu_seqlens.dtype == torch.int32
    mask = packed_context(seq_ids, "sdpa").mask[:, 0]
    from_segments = torch.zeros(12, 12, dtype=torch.bool)
    cu = flash.cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        from_segments[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    assert torch.equal(torch.block_diag(mask[0], mask[1]), from_segments)


def test_single_sample_rows_use_the_causal_kernel_with_the_same_result():
    """seq_ids all 0 takes SDPA's is_causal path; it equals the block-mask path."""
    seq_ids = torch.zeros(2, 7, dtype=torch.long)
    assert packed_context(seq_ids, "sdpa").mask is None
    q, k, v = torch.randn(2, 7, 4, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    masked = AttentionContext("sdpa", mask=torch.ones(7, 7, dtype=torch.bool).tril()[None, None])
    torch.testing.assert_close(attend(q, k, v, packed_context(seq_ids, "sdpa")), attend(q, k, v, masked))
