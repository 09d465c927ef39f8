"""Patch embedding + pixel shuffle + projector: InternVL's layout and shapes."""
from __future__ import annotations

import pytest
import torch

from evip.model.config import ModelConfig
from evip.model.mono import MonoInternVL
from evip.model.vision import PatchEmbedding, build_projector, pixel_shuffle, shuffle_patches
from tests.conftest import tiny_model_config


def test_pixel_shuffle_packs_2x2_neighbours_in_internvl_order():
    g = 6
    coords = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).float()
    out = pixel_shuffle(coords[None], 0.5)                    # [1, 3, 3, 8]
    assert out.shape == (1, 3, 3, 8)
    for a in range(3):
        for b in range(3):
            got = out[0, a, b].view(4, 2).tolist()
            assert got == [[2 * a, 2 * b], [2 * a, 2 * b + 1], [2 * a + 1, 2 * b], [2 * a + 1, 2 * b + 1]]


def test_a_448_tile_becomes_256_tokens_of_the_llm_width():
    cfg = ModelConfig()                                        # the released 2B shapes
    vision, mlp1 = PatchEmbedding(cfg), build_projector(cfg)
    assert vision.position_embedding.shape == (1, 1 + 32 * 32, 1024)
    assert [tuple(mlp1[i].weight.shape) for i in (0, 1, 3)] == [(4096,), (2048, 4096), (2048, 2048)]
    with torch.no_grad():
        tokens = mlp1(shuffle_patches(vision(torch.randn(1, 3, 448, 448)), cfg.downsample_ratio))
    assert tokens.shape == (1, 256, 2048) and cfg.tokens_per_tile == 256


def test_class_token_dropped_after_adding_positions():
    cfg = tiny_model_config()
    torch.manual_seed(0)
    vision = PatchEmbedding(cfg)
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        conv = vision.patch_embedding(pixels).flatten(2).transpose(1, 2)
        ours = vision(pixels)
    # at the native grid the bicubic interpolation is the identity
    torch.testing.assert_close(ours, conv + vision.position_embedding[:, 1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vision._pos_embed(cfg.grid, cfg.grid), vision.position_embedding[:, 1:].detach(),
                               rtol=1e-5, atol=1e-6)
    assert vision._pos_embed(8, 6).shape == (1, 48, cfg.vision_hidden_size)


def test_each_token_sees_its_own_28px_block():
    """Token k of a tile covers pixel block (k // side, k % side), 28 x 28 px, row-major."""
    cfg = tiny_model_config(image_size=112)                    # 8 x 8 patches -> 4 x 4 tokens
    torch.manual_seed(0)
    model = MonoInternVL(cfg)
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        base = model.embed_images(pixels)
        moved = pixels.clone()
        moved[..., 28:56, 84:112] += 1.0                       # block row 1, column 3 -> token 7
        changed = (model.embed_images(moved) - base).abs().amax(-1)[0]
    assert base.shape == (1, 16, cfg.hidden_size)
    assert changed.nonzero().squeeze(1).tolist() == [7]


def test_image_embeddings_land_on_the_image_tokens_in_order():
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = MonoInternVL(cfg)
    ids = torch.randint(1, 100, (2, 10))
    ids[0, 2:6] = ids[1, 1:5] = cfg.img_context_token_id
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        h, mask = model.embed(ids, pixels)
        images = model.embed_images(pixels)
    torch.testing.assert_close(h[0, 2:6], images[0])
    torch.testing.assert_close(h[1, 1:5], images[1])
    torch.testing.assert_close(h[~mask], model.tok_embeddings(ids[~mask]).detach())


def test_uint8_tiles_are_normalised_on_the_model_exactly_as_float_tiles():
    """The data workers ship uint8; the model's normalisation equals the data-side float path
    bit for bit (same arithmetic), in fp32 and after the cast to a low-precision model dtype."""
    from evip.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageProcessor
    from evip.model.vision import normalise_pixels
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = MonoInternVL(cfg)
    raw = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    floats = ImageProcessor.normalise(raw)
    assert floats.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(floats, (raw.float() / 255 - mean) / std, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model.embed_images(raw), model.embed_images(floats))
        assert torch.equal(model.vision(raw), model.vision(floats))
        model.to(torch.bfloat16)
        assert torch.equal(model.embed_images(raw), model.embed_images(floats))
    assert torch.equal(normalise_pixels(raw, torch.bfloat16), floats.to(torch.bfloat16))
    assert torch.equal(normalise_pixels(floats), floats)               # float input: already normalised
    with pytest.raises(TypeError, match="uint8"):
        normalise_pixels(raw.long())
