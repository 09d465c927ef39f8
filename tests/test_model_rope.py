"""InternLM2's dynamic NTK RoPE (rope_scaling {type: dynamic}), as the official modelling code
computes it: a forward over more than max_position_embeddings tokens changes the base of every
position; up to max_position_embeddings it is plain RoPE."""
from __future__ import annotations

import dataclasses

import torch
from conftest import tiny_model_config

from evip.model.mono import MonoInternVL
from evip.model.rope import rope_base, rope_for

MAX_POS, FACTOR = 8, 2.0


def official_table(seq_len: int, head_dim: int, theta: float, max_pos: int, factor: float):
    """cos/sin rows 0..seq_len-1, built the way InternLM2DynamicNTKScalingRotaryEmbedding builds its
    cache when asked for `seq_len` positions (the base formula from its _set_cos_sin_cache)."""
    base = theta
    if seq_len > max_pos:
        base = theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    t = torch.arange(seq_len).float()
    emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)
    return emb.cos(), emb.sin()


def test_tables_equal_the_official_cache_below_and_above_max_positions():
    cfg = tiny_model_config(max_position_embeddings=MAX_POS, rope_scaling="dynamic", rope_scaling_factor=FACTOR)
    for seq_len in (5, MAX_POS, MAX_POS + 1, 3 * MAX_POS):
        pos = torch.arange(seq_len)[None]
        rope = rope_for(pos, cfg.head_dim, rope_base(cfg, seq_len), torch.float32)
        cos, sin = official_table(seq_len, cfg.head_dim, cfg.rope_theta, MAX_POS, FACTOR)
        torch.testing.assert_close(rope.cos[0], cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(rope.sin[0], sin, rtol=0, atol=1e-6)
    assert rope_base(cfg, MAX_POS) == cfg.rope_theta < rope_base(cfg, MAX_POS + 1) < rope_base(cfg, 2 * MAX_POS)


def test_a_longer_sequence_changes_every_position():
    cfg = tiny_model_config(max_position_embeddings=MAX_POS, rope_scaling="dynamic", rope_scaling_factor=FACTOR)
    plain_cfg = dataclasses.replace(cfg, rope_scaling="none", rope_scaling_factor=1.0)
    torch.manual_seed(0)
    model = MonoInternVL(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    plain = MonoInternVL(plain_cfg).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (1, 3 * MAX_POS // 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        short, long = model(ids[:, :MAX_POS]).logits, model(ids).logits
        assert torch.equal(short, plain(ids[:, :MAX_POS]).logits)        # up to max_position_embeddings: plain
        unscaled = plain(ids).logits
        # longer: the base changes for every position, those below max_position_embeddings too
        # (position 0 attends only itself, where any rotation cancels)
        assert torch.equal(long[0, 0], unscaled[0, 0])
        assert all(not torch.allclose(long[0, i], unscaled[0, i]) for i in range(1, MAX_POS))
        assert not torch.allclose(long[0, :MAX_POS], short[0])
        # ... and equals plain RoPE with the enlarged base, computed here from the official formula
        t, d = ids.shape[1], cfg.head_dim
        base = cfg.rope_theta * (FACTOR * t / MAX_POS - (FACTOR - 1)) ** (d / (d - 2))
        enlarged = MonoInternVL(dataclasses.replace(plain_cfg, rope_theta=base)).eval()
        enlarged.load_state_dict(model.state_dict())
        torch.testing.assert_close(long, enlarged(ids).logits, rtol=0, atol=1e-5)
