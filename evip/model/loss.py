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
    """(flat indices over B*T of the positions that carry a loss, their target ids)."""
    targets = shifted_targets(labels, seq_ids).reshape(-1)
    sel = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return sel, targets.index_select(0, sel)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, kinds: Optional[torch.Tensor]) -> LossParts:
    """Cross-entropy of the labelled positions only: logits [N, V], targets [N], kinds [N] or None."""
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    loss_sum = per_token.sum()
    num = torch.tensor(targets.numel(), device=logits.device)
    loss = loss_sum / num.clamp(min=1)
    kind_sum = torch.zeros(len(KINDS), dtype=torch.float32, device=logits.device)
    kind_num = torch.zeros(len(KINDS), dtype=torch.int64, device=logits.device)
    if kinds is not None:
        known = (kinds >= 0) & (kinds < len(KINDS))
        kinds = torch.where(known, kinds, torch.zeros_like(kinds))
        kind_sum = kind_sum.index_add(0, kinds, per_token.detach() * known)
        kind_num = kind_num.index_add(0, kinds, known.long())
    return LossParts(loss, loss_sum, num, kind_sum, kind_num)


def packed_lm_loss(logits: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor,
                   kind_ids: Optional[torch.Tensor]) -> LossParts:
    """logits [B, T, V]; labels, seq_ids, kind_ids [B, T]. kind_ids None: per-kind sums stay 0."""
    sel, targets = labelled_positions(labels, seq_ids)
    kinds = None if kind_ids is None else kind_ids.reshape(-1).index_select(0, sel)
    return lm_loss(logits.reshape(-1, logits.shape[-1]).index_select(0, sel), targets, kinds)
