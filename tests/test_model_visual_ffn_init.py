"""`model.visual_ffn`: how the visual FFN experts start when an LLM is upcycled (the ablations'
switch): a copy of the text FFN (the paper), random, or none at all."""
from __future__ import annotations

import pytest
import torch
from weights_helpers import hf_llm, save_hf

from evip.model.config import ModelConfig
from evip.model.groups import named_groups
from evip.model.weights import load_pretrained_llm, save_mono2b

VISION = {"image_size": 56, "patch_size": 14, "vision_hidden_size": 32}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save_hf(hf_llm("llama"), d)
    return d


def _inputs(model):
    cfg = model.cfg
    ids = torch.tensor([[5, *[cfg.img_context_token_id] * cfg.tokens_per_tile, 17, 99, 3]])
    pixels = torch.randint(0, 256, (1, 3, cfg.image_size, cfg.image_size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    return ids, pixels


def test_copy_random_none(llm_dir):
    copy, _ = load_pretrained_llm(llm_dir, VISION, seed=0)
    rand, _ = load_pretrained_llm(llm_dir, VISION | {"visual_ffn": "random"}, seed=0)
    rand2, _ = load_pretrained_llm(llm_dir, VISION | {"visual_ffn": "random"}, seed=0)
    none, _ = load_pretrained_llm(llm_dir, VISION | {"visual_ffn": "none"}, seed=0)
    c, r, n = (dict(m.named_parameters()) for m in (copy, rand, none))
    ve = [k for k in c if ".feed_forward_ve." in k]
    assert ve and all(torch.equal(c[k], c[k.replace("_ve.", ".")]) for k in ve)          # copy: the text FFN
    assert all(not torch.equal(r[k], c[k]) for k in ve)                                 # random: not a copy ...
    assert all(abs(float(r[k].detach().std()) - 0.02) < 0.005 for k in ve)                       # ... normal(0, 0.02) ...
    assert all(torch.equal(r[k], p) for k, p in rand2.named_parameters())               # ... seeded
    assert not any(".feed_forward_ve." in k for k in n) and not named_groups(none)["visual_ffn"]
    # everything else is the same upcycled model
    assert all(torch.equal(r[k], c[k]) and torch.equal(n[k], c[k]) for k in n)
    # without visual experts, image tokens go through the text FFN: the copy model's outputs exactly
    ids, pixels = _inputs(copy)
    with torch.no_grad():
        assert torch.equal(none(ids, pixel_values=pixels).logits, copy(ids, pixel_values=pixels).logits)
        assert not torch.equal(rand(ids, pixel_values=pixels).logits, copy(ids, pixel_values=pixels).logits)


def test_no_visual_ffn_trains_without_expert_grads(llm_dir):
    none, _ = load_pretrained_llm(llm_dir, VISION | {"visual_ffn": "none"}, seed=0)
    ids, pixels = _inputs(none)
    none(ids, pixel_values=pixels, labels=ids).loss.backward()
    assert none.vision.patch_embedding.weight.grad.abs().sum() > 0


def test_bad_value_and_export_refusal(tmp_path, llm_dir):
    with pytest.raises(ValueError, match=r"model.visual_ffn='copied': expected one of copy, random, none"):
        ModelConfig(visual_ffn="copied")
    none, _ = load_pretrained_llm(llm_dir, VISION | {"visual_ffn": "none"}, seed=0)
    with pytest.raises(ValueError, match="has no visual FFN experts"):
        save_mono2b(none, tmp_path)
