"""Static modality routing: split tokens into text and image sets, run each expert only on its own
tokens, scatter the results back.

Mono-InternVL's rule is `out = E_t(x) * (1 - m) + E_v(x) * m` with `m` the <IMG_CONTEXT> mask.
The official training code computes both experts for every token; here each expert sees only its
tokens (gather with `index_select`, scatter with `index_copy_`), so the experts add parameters,
not FLOPs. An expert whose token set is empty still runs on an empty tensor, so its parameters get
zero gradients rather than none (data-parallel engines expect every trainable parameter to have a
gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Expert = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Routing:
    """Flat token indices (over B*T) of the text and the image tokens."""
    text_idx: torch.Tensor
    image_idx: torch.Tensor

    @classmethod
    def from_mask(cls, image_mask: torch.Tensor, num_image: Optional[int] = None) -> "Routing":
        """Both index sets from one stable sort (text tokens first, each set in token order): one
        host sync for the split point, none when the caller already knows `num_image`."""
        flat = image_mask.reshape(-1)
        if num_image is None:
            num_image = int(flat.sum())
        order = torch.argsort(flat.to(torch.int8), stable=True)
        n_text = flat.numel() - num_image
        return cls(text_idx=order[:n_text], image_idx=order[n_text:])

    @property
    def num_tokens(self) -> int:
        return self.text_idx.numel() + self.image_idx.numel()

    def gather(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B*T, C] -> (text rows, image rows)."""
        return x.index_select(0, self.text_idx), x.index_select(0, self.image_idx)

    def scatter(self, y_text: torch.Tensor, y_image: torch.Tensor) -> torch.Tensor:
        """Inverse of `gather`: [B*T, C'] with each row from its own expert's output."""
        out = y_text.new_empty(self.num_tokens, y_text.shape[-1])
        out.index_copy_(0, self.text_idx, y_text)
        out.index_copy_(0, self.image_idx, y_image.to(y_text.dtype))
        return out

    def apply(self, x: torch.Tensor, text_expert: Expert, image_expert: Expert) -> torch.Tensor:
        """Run each expert on its own rows of x [B*T, C]; the result in token order."""
        x_text, x_image = self.gather(x)
        return self.scatter(text_expert(x_text), image_expert(x_image))
