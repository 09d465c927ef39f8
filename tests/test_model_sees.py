"""The visual path end to end: a model must learn to name the colour of the picture in front of
it, each sample in a packed row its own. Guards the whole pixels -> patches -> pixel shuffle ->
projector -> image-token slots -> LLM chain against a silent break (tiles landing on another
sample's tokens, pixels ignored) that would leave a run learning only a soft prompt: the held-out
loss with the *own* image must fall far below the loss with another image (evals.other_images).

Every group trains here: a tiny *random* frozen LLM cannot be steered to name words through its
image slots at all (loss 3.75 of ln 128 = 4.85 with S1.1's groups, 3.59 with S1.3's, whatever
the lr), so the frozen-LLM version of this check needs a pretrained LLM (the demo's evals)."""
from __future__ import annotations

import torch

from evip.batch import IGNORE_INDEX
from evip.evals import other_images
from evip.model.mono import MonoInternVL
from tests.conftest import tiny_model_config

COLOURS = [(220, 30, 30), (30, 160, 50), (30, 70, 220), (240, 200, 20)]
WORD = [10, 11, 12, 13]            # the token that names each colour
START, END = 1, 2                  # stand-ins for <img> and </img>


def batch(cfg, colours: list[int], g: torch.Generator) -> dict:
    """One packed row: per sample <img> IMG*4 </img> colour-word; pixels a noisy solid colour."""
    tpt = cfg.tokens_per_tile
    ids, labels, seq, pos, tiles = [], [], [], [], []
    for i, c in enumerate(colours):
        sample = [START, *[cfg.img_context_token_id] * tpt, END, WORD[c]]
        ids += sample
        labels += [IGNORE_INDEX] * (len(sample) - 1) + [WORD[c]]
        seq += [i] * len(sample)
        pos += list(range(len(sample)))
        base = torch.tensor(COLOURS[c], dtype=torch.float32).view(3, 1, 1)
        noise = torch.randint(-25, 26, (3, cfg.image_size, cfg.image_size), generator=g)
        tiles.append((base + noise).clamp(0, 255).to(torch.uint8))
    t = lambda x: torch.tensor([x])
    return {"input_ids": t(ids), "labels": t(labels), "seq_ids": t(seq), "position_ids": t(pos),
            "pixel_values": torch.stack(tiles)}


def test_model_learns_to_name_the_colour_it_sees():
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = MonoInternVL(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        b = batch(cfg, torch.randint(0, 4, (8,), generator=g).tolist(), g)
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    held = batch(cfg, [0, 1, 2, 3, 1, 0, 3, 2], torch.Generator().manual_seed(1))
    swapped = held | {"pixel_values": other_images(held, cfg.tokens_per_tile, cfg.img_context_token_id)}
    with torch.no_grad():
        own, other = model(**held).loss.item(), model(**swapped).loss.item()
    assert own < 0.1 and other > 3.0, (own, other)        # it reads its own picture, not a prior
