"""Generation: the KV cache changes nothing, sampling is reproducible, images in the prompt work."""
from __future__ import annotations

import pytest
import torch

from evip.model.mono import MonoInternVL
from tests.conftest import tiny_model_config

CFG = tiny_model_config(visual_attention_experts=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MonoInternVL(CFG)
    for p in m.parameters():          # larger weights: sharper, more varied logits than 0.02 init
        p.data.mul_(4)
    return m


@pytest.fixture(scope="module")
def prompt():
    """Text, one image (2 tiles), text."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (1, 14), generator=g)
    ids[0, 2:2 + 2 * CFG.tokens_per_tile] = CFG.img_context_token_id
    return ids, torch.randn(2, 3, 56, 56, generator=g)


def test_cached_greedy_equals_recomputing_everything(model, prompt):
    ids, pixels = prompt
    cached = model.generate(ids, pixels, max_new_tokens=12)
    full = model.generate(ids, pixels, max_new_tokens=12, use_cache=False)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, full)
    assert len(set(cached[0].tolist())) > 1           # not a degenerate constant output


def test_cached_step_logits_equal_full_forward(model, prompt):
    """The last logits of each cached step match a fresh forward over the whole sequence."""
    ids, pixels = prompt
    cache = model.new_kv_cache(ids.shape[1] + 3)
    with torch.no_grad():
        step = model(ids, pixel_values=pixels, kv_cache=cache).logits[:, -1]
        seq = ids
        for token in (5, 17, 42):
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
            step = model(torch.tensor([[token]]), kv_cache=cache).logits[:, -1]
            full = model(seq, pixel_values=pixels).logits[:, -1]
            torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
    assert cache.length == ids.shape[1] + 3


def test_repeated_cache_decodes_continuations_side_by_side(model, prompt):
    """A one-row prompt cache repeated to 3 rows: 3 continuations in one batch give the logits of
    full forwards over prompt + each continuation; a wrong batch size is refused."""
    ids, pixels = prompt
    rest = torch.tensor([[5, 17, 42], [9, 9, 3], [42, 5, 17]])
    cache = model.new_kv_cache(ids.shape[1] + 3)
    with torch.no_grad():
        model(ids, pixel_values=pixels, kv_cache=cache)
        side = model(rest, kv_cache=cache.repeat(3)).logits
        for i in range(3):
            full = model(torch.cat([ids, rest[i:i + 1]], dim=1), pixel_values=pixels).logits[0, -3:]
            torch.testing.assert_close(side[i], full, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="takes B=1"):
            model(rest, kv_cache=cache)
    assert cache.length == ids.shape[1]


def test_image_conditions_generation(model, prompt):
    ids, pixels = prompt
    a = model.generate(ids, pixels, max_new_tokens=8)
    b = model.generate(ids, -pixels, max_new_tokens=8)
    assert not torch.equal(a, b)


def test_sampling_is_reproducible_with_a_seeded_generator(model, prompt):
    ids, pixels = prompt

    def sample(seed, **kw):
        return model.generate(ids, pixels, max_new_tokens=10, temperature=1.0,
                              generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(3), sample(3))
    assert not all(torch.equal(sample(3), sample(s)) for s in (4, 5, 6))
    assert torch.equal(sample(3, top_p=0.9), sample(3, top_p=0.9))
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy
    assert torch.equal(sample(9, top_p=1e-6), model.generate(ids, pixels, max_new_tokens=10))


def test_eos_stops_and_image_token_is_never_generated(model, prompt):
    ids, pixels = prompt
    greedy = model.generate(ids, pixels, max_new_tokens=12)
    eos = int(greedy[0, 3])
    first = greedy[0].tolist().index(eos)
    stopped = model.generate(ids, pixels, max_new_tokens=12, eos_token_id=eos)
    assert stopped[0].tolist() == greedy[0, :first + 1].tolist()
    sampled = model.generate(ids, pixels, max_new_tokens=30, temperature=5.0,
                             generator=torch.Generator().manual_seed(0))
    assert CFG.img_context_token_id not in sampled[0].tolist()


def test_text_only_prompt_and_training_mode_restored(model):
    model.train()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert out.shape == (1, 4) and model.training
    model.eval()
