"""Training-time behaviour: activation checkpointing is exact; bf16 runs without dtype surprises."""
from __future__ import annotations

import torch

from evip.batch import IGNORE_INDEX
from evip.model.mono import MonoInternVL
from tests.conftest import tiny_model_config


def _batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (2, 16), generator=g)
    ids[0, 1:9] = cfg.img_context_token_id            # two tiles in row 0
    ids[1, 3:7] = cfg.img_context_token_id            # one tile in row 1
    labels = torch.where(ids == cfg.img_context_token_id, IGNORE_INDEX, ids)
    seq_ids = torch.tensor([[0] * 10 + [1] * 6, [0] * 12 + [-1] * 4])
    pos = torch.tensor([list(range(10)) + list(range(6)), list(range(12)) + [0] * 4])
    kinds = torch.tensor([[0] * 10 + [2] * 6, [1] * 12 + [-1] * 4])
    return dict(input_ids=ids, labels=labels, seq_ids=seq_ids, position_ids=pos, kind_ids=kinds,
                pixel_values=torch.randn(3, 3, 56, 56, generator=g))


def _loss_and_grads(checkpointing):
    cfg = tiny_model_config(visual_attention_experts=True, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = MonoInternVL(cfg).train()
    out = model(**_batch(cfg))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_loss_and_grads():
    loss_a, grads_a = _loss_and_grads(False)
    loss_b, grads_b = _loss_and_grads(True)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name, g in grads_a.items():
        assert g is not None, name
        torch.testing.assert_close(g, grads_b[name], rtol=1e-6, atol=1e-8, msg=name)


def test_activation_checkpointing_really_recomputes():
    cfg = tiny_model_config(activation_checkpointing=True)
    model = MonoInternVL(cfg).train()
    calls = []
    model.layers[0].feed_forward.register_forward_hook(lambda *a: calls.append(1))
    model(**_batch(cfg)).loss.backward()
    assert len(calls) == 2                              # forward + recompute in backward
    model.eval()
    calls.clear()
    with torch.no_grad():
        model(**_batch(cfg))
    assert len(calls) == 1


def test_bf16_forward_backward():
    cfg = tiny_model_config(visual_attention_experts=True)
    torch.manual_seed(0)
    model = MonoInternVL(cfg).to(torch.bfloat16).train()
    batch = _batch(cfg)                                 # fp32 pixels into a bf16 model
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    assert out.loss.dtype == out.loss_sum.dtype == out.kind_loss_sum.dtype == torch.float32
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        assert torch.isfinite(p.grad).all(), name
    ref = MonoInternVL(cfg)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        loss32 = ref(**batch).loss
    assert abs(out.loss.item() - loss32.item()) < 0.05


def test_loss_is_trainable_end_to_end():
    """A few AdamW steps on one batch lower the loss (image embeddings get gradients too)."""
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = MonoInternVL(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _batch(cfg)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = model(**batch)
        out.loss.backward()
        assert model.vision.patch_embedding.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_loss_without_full_logits_is_the_same():
    """return_logits=False runs the head on labelled positions only: same loss, same grads."""
    cfg = tiny_model_config()
    results = []
    for return_logits in (True, False):
        torch.manual_seed(0)
        model = MonoInternVL(cfg).train()
        out = model(**_batch(cfg), return_logits=return_logits)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (full, g_full), (lean, g_lean) = results
    assert full.logits is not None and lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    torch.testing.assert_close(lean.kind_loss_sum, full.kind_loss_sum)
    assert torch.equal(lean.kind_num_tokens, full.kind_num_tokens) and lean.num_tokens == full.num_tokens
    for name in g_full:
        torch.testing.assert_close(g_lean[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_text_only_batch_gives_every_parameter_a_gradient():
    """An empty pixel tensor [0, 3, S, S] (a text-only micro-batch in an image stage) still gives the
    patch embedding, projector and visual experts zero gradients: engines expect one per parameter."""
    cfg = tiny_model_config(visual_attention_experts=True)
    model = MonoInternVL(cfg).train()
    ids = torch.randint(1, 100, (1, 8))
    model(ids, labels=ids, pixel_values=torch.zeros(0, 3, 56, 56)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert torch.count_nonzero(model.mlp1[1].weight.grad) == 0
    assert torch.count_nonzero(model.layers[0].feed_forward_ve.w1.weight.grad) == 0
