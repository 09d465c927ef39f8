"""Fewer host syncs per forward: the text/image routing comes from one stable sort split at the
image-token count the embedding already reads (no `nonzero` per index set), with the same indices."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from evip.model.routing import Routing


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=64), st.integers(1, 3))
def test_routing_from_one_sort_equals_nonzero(bits, rows):
    mask = torch.tensor(bits * rows).view(rows, -1)
    flat = mask.reshape(-1)
    for r in (Routing.from_mask(mask), Routing.from_mask(mask, int(flat.sum()))):
        assert torch.equal(r.text_idx, (~flat).nonzero().squeeze(1))
        assert torch.equal(r.image_idx, flat.nonzero().squeeze(1))
