"""The head + cross-entropy in chunks (loss.head_lm_loss): the same loss, per-kind sums and
gradients as the logits path, and no tensor of more than one chunk of logits, forward or backward."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from evip.model import loss as loss_mod
from evip.model.loss import head_lm_loss, lm_loss

N, H, V = 37, 24, 50


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    w = (0.3 * torch.randn(V, H, generator=g, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    kinds = torch.randint(-1, 3, (N,), generator=g)
    return h, w, targets, kinds


@pytest.mark.parametrize("rows", [1, 5, N, 1000])
def test_chunked_head_loss_equals_the_logits_path(rows):
    h, w, targets, kinds = _inputs()
    ref = lm_loss(F.linear(h, w), targets, kinds)
    ref.loss.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = head_lm_loss(h, w, targets, kinds, chunk_rows=rows)
    (3.0 * out.loss).backward()                             # the incoming gradient scales both
    for name in ("loss", "loss_sum", "num_tokens", "kind_loss_sum", "kind_num_tokens"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name))   # fp32: the loss is fp32
    torch.testing.assert_close(h.grad, 3.0 * ref_grads[0])
    torch.testing.assert_close(w.grad, 3.0 * ref_grads[1])


def test_frozen_head_and_no_grad():
    h, w, targets, kinds = _inputs()
    w.requires_grad_(False)
    head_lm_loss(h, w, targets, kinds, chunk_rows=4).loss.backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        out = head_lm_loss(h, w, targets, kinds, chunk_rows=4)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, lm_loss(F.linear(h, w), targets, kinds).loss.detach())


class _LargestVocabTensor(TorchDispatchMode):
    """The most rows of vocabulary-wide tensors ([*, V], but the head's [H, V] transpose) alive
    at once: `rows`, counted as each op returns (a tensor is alive while its Python object is)."""
    def __init__(self):
        super().__init__()
        self.rows = 0
        self.alive: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V and t.shape[0] != H:
                self.alive.append(weakref.ref(t))
        live = {id(x): x for x in (r() for r in self.alive) if x is not None}
        by_storage = {x.untyped_storage().data_ptr(): x.numel() // V for x in live.values()}
        self.rows = max(self.rows, sum(by_storage.values()))
        return out


def test_logits_memory_is_one_chunk_forward_and_backward(monkeypatch):
    h, w, targets, kinds = _inputs()
    with _LargestVocabTensor() as seen:
        head_lm_loss(h, w, targets, kinds, chunk_rows=8).loss.backward()
    assert seen.rows == 8
    monkeypatch.setattr(loss_mod, "LOGITS_CHUNK_ELEMENTS", 6 * V)     # the default chunk: elements / V
    with _LargestVocabTensor() as seen:
        head_lm_loss(h, w, targets, kinds).loss.backward()
    assert seen.rows == 6
    with _LargestVocabTensor() as seen:                               # the logits path: all N rows
        lm_loss(F.linear(h, w), targets, kinds).loss.backward()
    assert seen.rows >= N                                           # N rows, several copies


def test_model_forward_in_chunks_equals_the_logits_path(tiny_cfg, monkeypatch):
    from evip.model.mono import MonoInternVL
    from trainer_helpers import GeneratedBatches

    torch.manual_seed(0)
    model = MonoInternVL(tiny_cfg)
    batch = GeneratedBatches(tiny_cfg, 0, 0).batch(0)
    monkeypatch.setattr(loss_mod, "LOGITS_CHUNK_ELEMENTS", 4 * tiny_cfg.vocab_size)   # 4 positions a chunk
    results = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(**batch, return_logits=return_logits)
        out.loss.backward()
        results.append((out.loss.detach(), out.kind_loss_sum, [p.grad.clone() for p in model.parameters()]))
    (la, ka, ga), (lb, kb, gb) = results
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ka, kb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
