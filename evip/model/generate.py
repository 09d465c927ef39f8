"""Autoregressive decoding of one sample, with a KV cache, images in the prompt.

Greedy when temperature == 0, else temperature + nucleus (top-p) sampling drawn from `generator`
(seeded -> reproducible). The <IMG_CONTEXT> token is never generated (it would need pixels).
`use_cache=False` recomputes the whole sequence at every step (the reference the cache is tested
against).
"""
from __future__ import annotations

from typing import Optional

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [V] (fp32) -> next token id (0-d LongTensor)."""
    if temperature == 0.0:
        return logits.argmax()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p          # always keeps the top token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return torch.multinomial(probs / probs.sum(), 1, generator=generator)[0]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, eos_token_id: Optional[int] = None,
             use_cache: bool = True) -> torch.Tensor:
    """Prompt input_ids [1, T] -> new tokens [1, n], n <= max_new_tokens (stops after eos)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate takes one prompt, input_ids [1, T]; got {list(input_ids.shape)}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    was_training = model.training
    model.eval()
    img_id = model.cfg.img_context_token_id
    cache = model.new_kv_cache(input_ids.shape[1] + max_new_tokens) if use_cache else None
    seq = input_ids
    new: list[torch.Tensor] = []
    step_ids, step_pixels = input_ids, pixel_values
    try:
        for _ in range(max_new_tokens):
            if cache is None:
                logits = model(seq, pixel_values=pixel_values).logits[0, -1]
            else:
                logits = model(step_ids, pixel_values=step_pixels, kv_cache=cache).logits[0, -1]
            logits = logits.float()
            logits[img_id] = float("-inf")
            token = sample_next(logits, temperature, top_p, generator).view(1, 1)
            new.append(token)
            seq = torch.cat([seq, token], dim=1)
            step_ids, step_pixels = token, None
            if eos_token_id is not None and int(token) == eos_token_id:
                break
    finally:
        model.train(was_training)
    if not new:
        return input_ids.new_zeros(1, 0)
    return torch.cat(new, dim=1)
