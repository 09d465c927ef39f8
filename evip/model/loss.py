"""Next-token cross-entropy over packed rows, with per-kind sums for logging.

The logits at position t predict `labels[t + 1]` (HF convention: labels are not pre-shifted). A
shift never crosses a sample boundary: the target is dropped where `seq_ids` changes. Positions
whose target is -100 carry no loss. The loss is computed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from evip.batch import IGNORE_INDEX, KINDS


@dataclass
class LossParts:
    loss: torch.Tensor             # mean over labelled positions (0 when there are none)
    loss_sum: torch.Tensor         # fp32 scalar
    num_tokens: torch.Tensor       # int64 scalar
    kind_loss_sum: torch.Tensor    # fp32 [3]: caption, chat, text
    kind_num_tokens: torch.Tensor  # int64 [3]


def shifted_targets(labels: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] targets for each position's logits: labels[t+1] within a sample, else -100."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    same = seq_ids[:, 1:] == seq_ids[:, :-1]
    targets[:, :-1] = torch.where(same, labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE_INDEX))
    return targets


def labelled_positions(labels: torch.Tensor, seq_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices over B*T of the positions that carry a loss, their target ids). A host sync on
    a GPU (the count); the data loader computes it on its workers instead (evip/model/layout.py)."""
    targets = shifted_targets(labels, seq_ids).reshape(-1)
    sel = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return sel, targets.index_select(0, sel)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, kinds: Optional[torch.Tensor]) -> LossParts:
    """Cross-entropy of the labelled positions only: logits [N, V], targets [N], kinds [N] or None."""
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    return _parts(per_token.sum(), per_token.detach(), kinds)


def _parts(loss_sum: torch.Tensor, per_token: torch.Tensor, kinds: Optional[torch.Tensor]) -> LossParts:
    # a fill, not torch.tensor(n, device=...): that copies from the host, a sync on a GPU
    num = torch.full((), per_token.numel(), dtype=torch.int64, device=per_token.device)
    loss = loss_sum / num.clamp(min=1)
    kind_sum = torch.zeros(len(KINDS), dtype=torch.float32, device=per_token.device)
    kind_num = torch.zeros(len(KINDS), dtype=torch.int64, device=per_token.device)
    if kinds is not None:
        known = (kinds >= 0) & (kinds < len(KINDS))
        kinds = torch.where(known, kinds, torch.zeros_like(kinds))
        kind_sum = kind_sum.index_add(0, kinds, per_token * known)
        kind_num = kind_num.index_add(0, kinds, known.long())
    return LossParts(loss, loss_sum, num, kind_sum, kind_num)


#: logits elements one chunk of `head_lm_loss` may hold (2**27: 512 MB in fp32, 1,450 positions at
#: InternLM2's 92,544-token vocabulary); the logits memory is bounded by this, not by N x V.
LOGITS_CHUNK_ELEMENTS = 2 ** 27


def head_lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kinds: Optional[torch.Tensor],
                 chunk_rows: Optional[int] = None) -> LossParts:
    """`lm_loss(F.linear(h, weight), targets, kinds)` without the [N, V] logits: the head and the
    cross-entropy run `chunk_rows` positions at a time (default: LOGITS_CHUNK_ELEMENTS // V), and
    each chunk's gradients are computed as it goes (softmax - one-hot), so neither the forward nor
    the backward keeps more than one chunk of logits. h [N, H], weight [V, H] (the head)."""
    rows = chunk_rows or max(1, LOGITS_CHUNK_ELEMENTS // weight.shape[0])
    grads = torch.is_grad_enabled()
    loss_sum, per_token = _ChunkedHeadCE.apply(h, weight, targets, rows, grads and h.requires_grad,
                                               grads and weight.requires_grad)
    return _parts(loss_sum, per_token, kinds)


class _ChunkedHeadCE(torch.autograd.Function):
    """(sum of the per-position CE, the per-position CE detached) of logits = h @ weight^T, in
    chunks of positions. The gradients of loss_sum w.r.t. h and weight are computed in the forward,
    chunk by chunk, and scaled by the incoming gradient in the backward (loss_sum is a scalar)."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows: int, want_h: bool, want_w: bool):
        n = h.shape[0]
        per_token = torch.empty(n, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for s in range(0, n, rows):
            hc, tc = h[s:s + rows], targets[s:s + rows]
            logits = F.linear(hc, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            per_token[s:s + rows] = lse - logits.gather(1, tc[:, None]).squeeze(1)
            if want_h or want_w:
                g = logits.sub_(lse[:, None]).exp_()                         # softmax, in place
                g.scatter_add_(1, tc[:, None], torch.full_like(lse[:, None], -1.0))
                g = g.to(h.dtype)
                if want_h:
                    grad_h[s:s + rows] = g @ weight
                if want_w:
                    grad_w.add_((g.t() @ hc).float())                    # chunks summed in fp32
            logits = g = None         # free this chunk before the next one is computed
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(per_token)
        ctx.weight_dtype = weight.dtype
        return per_token.sum(), per_token

    @staticmethod
    def backward(ctx, grad_sum, _grad_per_token):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_sum.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_sum).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def packed_lm_loss(logits: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor,
                   kind_ids: Optional[torch.Tensor],
                   labelled: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> LossParts:
    """logits [B, T, V]; labels, seq_ids, kind_ids [B, T]. kind_ids None: per-kind sums stay 0.
    `labelled`: `labelled_positions(labels, seq_ids)` when the caller has it (no host sync)."""
    sel, targets = labelled if labelled is not None else labelled_positions(labels, seq_ids)
    kinds = None if kind_ids is None else kind_ids.reshape(-1).index_select(0, sel)
    return lm_loss(logits.reshape(-1, logits.shape[-1]).index_select(0, sel), targets, kinds)
