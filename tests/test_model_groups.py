"""Parameter groups on the full Mono-InternVL-2B shape, built on the meta device (no memory)."""
from __future__ import annotations

import pytest
import torch

from evip.model.config import ModelConfig
from evip.model.groups import GROUPS, group_of, named_groups
from evip.model.mono import MonoInternVL
from tests.conftest import tiny_model_config


def test_groups_partition_the_full_model_built_on_meta():
    with torch.device("meta"):
        model = MonoInternVL(ModelConfig(visual_attention_experts=True))
    groups = named_groups(model)
    assert tuple(groups) == GROUPS
    for g in GROUPS:
        assert groups[g], f"group {g} is empty"
    names = [n for members in groups.values() for n, _ in members]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())      # each exactly once
    assert all(p.device.type == "meta" for _, p in model.named_parameters())
    sizes = {g: sum(p.numel() for _, p in m) for g, m in groups.items()}
    # InternLM2-1.8B shapes: text FFN 24 x 3 x 2048 x 8192, attention (GQA 16/8 heads) 24 x 2048 x 6144
    assert sizes["text_ffn"] == sizes["visual_ffn"] == 24 * 3 * 2048 * 8192
    assert sizes["attention"] == sizes["visual_attn"] == 24 * 2048 * (2048 + 2 * 1024 + 2048)
    assert sizes["norms"] == 49 * 2048
    assert sizes["embeddings"] == sizes["head"] == 92553 * 2048


def test_released_2b_parameter_count():
    """Mono-InternVL-2B: ~3.1B total parameters, ~1.8B active per token."""
    with torch.device("meta"):
        model = MonoInternVL(ModelConfig())
    groups = {g: sum(p.numel() for _, p in m) for g, m in named_groups(model).items()}
    total = sum(groups.values())
    assert 3.0e9 < total < 3.2e9
    assert 1.7e9 < total - groups["visual_ffn"] - groups["patch_embed"] < 1.9e9
    assert groups["visual_attn"] == 0


@pytest.mark.parametrize("name, group", [
    ("vision.patch_embedding.weight", "patch_embed"), ("vision.class_embedding", "patch_embed"),
    ("mlp1.3.bias", "patch_embed"), ("tok_embeddings.weight", "embeddings"), ("output.weight", "head"),
    ("norm.weight", "norms"), ("layers.3.attention_norm.weight", "norms"), ("layers.3.ffn_norm.weight", "norms"),
    ("layers.3.attention.q_proj.weight", "attention"), ("layers.3.attention_ve.o_proj.weight", "visual_attn"),
    ("layers.3.feed_forward.w2.weight", "text_ffn"), ("layers.3.feed_forward_ve.w1.weight", "visual_ffn"),
])
def test_group_of(name, group):
    assert group_of(name) == group


@pytest.mark.parametrize("name", ["module.norm.weight", "layers.x.attention.q_proj.weight", "attention.wqkv.weight",
                                  "layers.0.attention_extra.weight", "norm"])
def test_unknown_parameter_names_are_errors_naming_it(name):
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        group_of(name)


def test_tied_head_has_no_output_parameter():
    model = MonoInternVL(tiny_model_config(tie_word_embeddings=True))
    groups = named_groups(model)
    assert groups["head"] == [] and "output.weight" not in model.state_dict()
    h = torch.randn(2, 3, 64)
    torch.testing.assert_close(model.head(h), h @ model.tok_embeddings.weight.t())


def test_meta_build_then_init_is_deterministic():
    cfg = tiny_model_config(visual_attention_experts=True)
    states = []
    for _ in range(2):
        with torch.device("meta"):
            model = MonoInternVL(cfg)
        model.to_empty(device="cpu")
        torch.manual_seed(123)
        model.init_weights()
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert states[0]["layers.0.ffn_norm.weight"].eq(1).all()
    assert 0.015 < states[0]["layers.0.feed_forward.w1.weight"].std() < 0.025
    torch.manual_seed(7)
    a = MonoInternVL(cfg).state_dict()
    torch.manual_seed(7)
    b = MonoInternVL(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
