"""The FFN experts: SwiGLU `w2(silu(w1 x) * w3 x)`, no bias; one text and one visual per layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)   # gate
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)   # up
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)   # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def dense_masked_ffn(x: torch.Tensor, image_mask: torch.Tensor, text_ffn: nn.Module,
                     visual_ffn: nn.Module) -> torch.Tensor:
    """The official Mono-InternVL formula, both experts on every token:
    `FFN_t(x) * (1 - m) + FFN_v(x) * m`. The reference the routed layer is tested and benchmarked
    against; the model itself never calls it."""
    m = image_mask.unsqueeze(-1).to(x.dtype)
    return text_ffn(x) * (1 - m) + visual_ffn(x) * m
