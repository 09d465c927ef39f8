"""The routed decoder layer equals the official dense formula, outputs and gradients."""
from __future__ import annotations

import pytest
import torch

from evip.model.decoder import DecoderLayer
from evip.model.experts import dense_masked_ffn
from evip.model.packed_attention import packed_context
from evip.model.rope import rope_for
from evip.model.routing import Routing
from tests.conftest import tiny_model_config


class DenseRouting:
    """The official code's rule (same interface as Routing): every expert on every token, mixed
    by the mask."""

    def __init__(self, image_mask: torch.Tensor):
        self.m = image_mask.reshape(-1, 1).float()

    def apply(self, x, text_expert, image_expert):
        return text_expert(x) * (1 - self.m) + image_expert(x) * self.m


def _inputs(cfg, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, cfg.hidden_size, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.5
    seq_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [-1] * 3])[:b]
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(b, t)
    rope = rope_for(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
    return x, mask, rope, packed_context(seq_ids, "sdpa")


def _run(layer, x, routing, rope, ctx):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(x, rope, ctx, routing)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("visual_attention_experts", [False, True])
def test_routed_layer_equals_dense_formula(visual_attention_experts):
    torch.manual_seed(0)
    cfg = tiny_model_config(visual_attention_experts=visual_attention_experts, attention_bias=True)
    layer = DecoderLayer(cfg, 0)
    for p in layer.parameters():          # distinct experts, non-trivial norms and biases
        torch.nn.init.normal_(p, std=0.1)
    x, mask, rope, ctx = _inputs(cfg)
    out_r, gx_r, g_r = _run(layer, x, Routing.from_mask(mask), rope, ctx)
    out_d, gx_d, g_d = _run(layer, x, DenseRouting(mask), rope, ctx)
    torch.testing.assert_close(out_r, out_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_r, gx_d, rtol=1e-5, atol=1e-5)
    assert g_r.keys() == g_d.keys()
    for name in g_r:
        torch.testing.assert_close(g_r[name], g_d[name], rtol=1e-5, atol=1e-5, msg=name)
    assert g_r["feed_forward_ve.w1.weight"].abs().sum() > 0      # both experts really trained


def test_ffn_block_equals_spec_formula():
    """h + FFN_t(n(h)) * (1 - m) + FFN_v(n(h)) * m, written out with the spec's own function."""
    torch.manual_seed(1)
    cfg = tiny_model_config()
    layer = DecoderLayer(cfg, 0)
    x, mask, _, _ = _inputs(cfg, seed=1)
    ours = layer.ffn_block(x, Routing.from_mask(mask))
    ref = x + dense_masked_ffn(layer.ffn_norm(x), mask, layer.feed_forward, layer.feed_forward_ve)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_each_expert_sees_only_its_own_tokens():
    torch.manual_seed(2)
    cfg = tiny_model_config(visual_attention_experts=True)
    layer = DecoderLayer(cfg, 0)
    x, mask, rope, ctx = _inputs(cfg, seed=2)
    seen: dict[str, list[int]] = {}

    def record(name):
        return lambda module, args: seen.setdefault(name, []).append(args[0].shape[0])

    for name in ("feed_forward", "feed_forward_ve", "attention.q_proj", "attention_ve.q_proj",
                 "attention.o_proj", "attention_ve.o_proj"):
        layer.get_submodule(name).register_forward_pre_hook(record(name))
    layer(x, rope, ctx, Routing.from_mask(mask))
    n_img, n_txt = int(mask.sum()), int((~mask).sum())
    assert 0 < n_img < mask.numel()
    assert seen == {"feed_forward": [n_txt], "feed_forward_ve": [n_img],
                    "attention.q_proj": [n_txt], "attention_ve.q_proj": [n_img],
                    "attention.o_proj": [n_txt], "attention_ve.o_proj": [n_img]}


def test_empty_expert_gets_zero_grads_not_none():
    """A text-only batch still gives the visual expert a (zero) gradient: engines expect one."""
    cfg = tiny_model_config()
    layer = DecoderLayer(cfg, 0)
    x, _, rope, ctx = _inputs(cfg)
    layer(x, rope, ctx, Routing.from_mask(torch.zeros(x.shape[:2], dtype=torch.bool))).sum().backward()
    grad = layer.feed_forward_ve.w1.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    assert layer.feed_forward.w1.weight.grad.abs().sum() > 0
