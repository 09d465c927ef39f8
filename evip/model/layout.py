"""The index layout of one packed micro-batch, computed where it costs no host sync.

The forward needs, besides the batch's tensors, a few index sets whose *sizes* depend on the data:
the text and image token positions (routing.py), the labelled positions and their targets
(loss.py), the varlen segments `cu_seqlens` with their longest length, and whether every row is
one whole sample (packed_attention.py). Found on a GPU, each size is a device -> host sync (a
`nonzero`, an `.item()`), and the labelled-position one waits for the whole forward to that point.

`PackedLayout.of(...)` finds them with the very same functions on the CPU: the data loader does
it in its workers (evip/data/loader.py) and ships it in the batch under `LAYOUT_KEY`; it moves to
the GPU with the batch (`.to(device, non_blocking=True)`, pinned with it), and the model takes
the indices from it instead of searching (MonoInternVL.forward(layout=...)). The sizes are then
tensor shapes and Python numbers: no sync. Same integers, so the same results, bit for bit.

A layout belongs to the input_ids, labels and seq_ids it was computed from: a caller that changes
any of them must drop the layout (or compute a new one). Changing pixel_values keeps it valid.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Union

import torch

from evip.model.loss import labelled_positions
from evip.model.packed_attention import cu_seqlens, segment_max_len
from evip.model.routing import Routing

Device = Union[torch.device, str, int]


@dataclass(eq=False)
class PackedLayout:
    shape: tuple[int, int]        # (B, T) of the batch it was computed for
    text_idx: torch.Tensor        # int64 [n_text]: flat positions (over B*T) of the text tokens
    image_idx: torch.Tensor       # int64 [n_image]: flat positions of the <IMG_CONTEXT> tokens
    loss_idx: torch.Tensor        # int64 [n_labelled]: flat positions whose logits carry a loss
    loss_targets: torch.Tensor    # int64 [n_labelled]: their target ids
    cu_seqlens: torch.Tensor      # int32 [segments + 1] (packed_attention.cu_seqlens)
    max_seqlen: int               # longest segment
    one_sample_rows: bool         # every row is one whole sample (seq_ids all 0): plain causal attention

    @classmethod
    def of(cls, input_ids: torch.Tensor, labels: torch.Tensor, seq_ids: torch.Tensor,
           img_context_token_id: int) -> "PackedLayout":
        """The layout of a packed batch (evip/batch.py), by the functions the model would run itself.
        Call it on CPU tensors (the loader's workers): on a GPU it costs the syncs it saves."""
        routing = Routing.from_mask(input_ids == img_context_token_id)
        loss_idx, loss_targets = labelled_positions(labels, seq_ids)
        cu = cu_seqlens(seq_ids)
        return cls(shape=tuple(input_ids.shape), text_idx=routing.text_idx, image_idx=routing.image_idx,
                   loss_idx=loss_idx, loss_targets=loss_targets, cu_seqlens=cu,
                   max_seqlen=segment_max_len(cu), one_sample_rows=bool((seq_ids == 0).all()))

    @property
    def routing(self) -> Routing:
        return Routing(text_idx=self.text_idx, image_idx=self.image_idx)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def _with(self, tensors: dict[str, torch.Tensor]) -> "PackedLayout":
        return PackedLayout(**{f.name: getattr(self, f.name) for f in fields(self)} | tensors)

    def to(self, device: Device, non_blocking: bool = False) -> "PackedLayout":
        """Every index tensor on `device` (as the batch's tensors are moved: trainer, evals)."""
        return self._with({k: v.to(device, non_blocking=non_blocking) for k, v in self._tensors().items()})

    def pin_memory(self) -> "PackedLayout":
        """Page-locked copies (DataLoader(pin_memory=True) calls this, as for the batch's tensors)."""
        return self._with({k: v.pin_memory() for k, v in self._tensors().items()})

    @property
    def device(self) -> torch.device:
        return self.text_idx.device

    def check(self, input_ids: torch.Tensor) -> None:
        """Raise unless this layout can serve a forward of input_ids (shape and device; no sync)."""
        if tuple(input_ids.shape) != tuple(self.shape):
            raise ValueError(f"the batch's layout was computed for input_ids of shape {list(self.shape)}, got "
                             f"{list(input_ids.shape)}: recompute it (PackedLayout.of) after changing the batch, "
                             "or drop it")
        if self.device != input_ids.device:
            raise ValueError(f"the batch's layout is on {self.device}, input_ids on {input_ids.device}: move it "
                             "with the batch (layout.to(device, non_blocking=True))")

    def __eq__(self, other: object) -> bool:
        """Equal when every index and number is (for tests and resume checks)."""
        if not isinstance(other, PackedLayout):
            return NotImplemented
        mine, theirs = self._tensors(), other._tensors()
        return (tuple(self.shape) == tuple(other.shape) and self.max_seqlen == other.max_seqlen
                and self.one_sample_rows == other.one_sample_rows
                and all(torch.equal(mine[k], theirs[k]) for k in mine))

