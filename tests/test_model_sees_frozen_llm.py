"""EViP's first claim on a real LLM: with the LLM frozen, training only the patch embedding and the
visual FFN experts (S1.1's groups) makes the model read its pictures.

The real SmolLM2-135M-Instruct, upcycled by `load_pretrained_llm`; pictures of one large shape in
one of six colours (56 px tiles: 4 image tokens), each captioned with its colour word, 16 to a
packed row; a plain loop, AdamW. Held out: pictures never trained on, each caption scored with its
own picture and with another held-out picture (evals.other_images). The model must
name the colour of the picture it is shown (own-picture loss far below the other-picture loss, and
the right colour the likeliest for at least half the pictures, 3x chance), while every LLM weight
stays bit-identical. Measured: own 0.24, other 3.17, 8 of 12 right.

What this cannot show: shapes, positions or words (the demo's held-out questions do), nor anything
about scale beyond 135M parameters."""
from __future__ import annotations

import io
import random

import pytest
import torch

from evip.data.images import ImageConfig
from evip.data.packing import Packer
from evip.data.record import Record
from evip.data.sample import SampleBuilder, SampleConfig
from evip.demo.scenes import COLOURS, SceneStyle, render_scene
from evip.evals import other_images
from evip.model.groups import group_of
from evip.model.weights import load_pretrained_llm

ONE_SHAPE = SceneStyle("one_shape", 1, 1, 0.4, (("centre", (0.5, 0.5)),), 0.0)
STEPS = 60
TRAINS = ("patch_embed", "visual_ffn")      # S1.1's trainable groups


def picture(seed: int) -> tuple[bytes, str]:
    image, scene = render_scene(seed, 56, ONE_SHAPE)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), scene.objects[0].colour


def packed(builder, seeds, colour_of=None) -> dict:
    """One packed row of the pictures of `seeds`, each captioned with its colour (or `colour_of(seed)`)."""
    packer = Packer(token_budget=16 * len(seeds), max_images_per_pack=len(seeds), pad_id=0)
    for s in seeds:
        png, colour = picture(s)
        packer.add(builder(Record(key=str(s), source="t", shard="t", kind="caption", images=[png],
                                  text=colour_of(s) if colour_of else colour)))
    (batch,) = packer.flush()
    return batch


@pytest.mark.slow
def test_frozen_llm_learns_to_name_the_colour_it_sees(smollm2_dir):
    torch.manual_seed(0)
    model, tok = load_pretrained_llm(smollm2_dir, {"image_size": 56, "patch_size": 14, "vision_hidden_size": 128})
    for name, p in model.named_parameters():
        p.requires_grad = group_of(name) in TRAINS
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    builder = SampleBuilder(SampleConfig(max_length=64, image=ImageConfig(max_tiles=1, use_thumbnail=False)),
                            tok, model.cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    keys = ("input_ids", "labels", "seq_ids", "position_ids", "pixel_values", "kind_ids")
    rng = random.Random(0)
    for _ in range(STEPS):
        batch = packed(builder, [rng.randrange(10**6) for _ in range(16)])
        model(**{k: batch[k] for k in keys}, return_logits=False).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    held = [10**7 + i for i in range(24)]
    batch = packed(builder, held)
    swapped = batch | {"pixel_values": other_images(batch, model.cfg.tokens_per_tile, model.cfg.img_context_token_id)}
    with torch.no_grad():
        own = model(**{k: batch[k] for k in keys}).loss.item()
        other = model(**{k: swapped[k] for k in keys}).loss.item()
        right = 0
        for s in held[:12]:          # the right colour is the likeliest of the six for many pictures
            losses = [model(**{k: v for k, v in packed(builder, [s], lambda _: c).items() if k in keys}).loss.item()
                      for c in COLOURS]
            right += min(range(len(COLOURS)), key=losses.__getitem__) == list(COLOURS).index(picture(s)[1])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), "an LLM weight moved"
    assert own < 0.5 * other and right >= 6, (own, other, right)     # chance: 2 of 12
