"""Bad inputs fail early with a message naming the cause and the expected value."""
from __future__ import annotations

import pytest
import torch

from evip.model.mono import MonoInternVL
from tests.conftest import tiny_model_config

CFG = tiny_model_config()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MonoInternVL(CFG)


def _ids(n_image_tokens, t=12):
    ids = torch.randint(1, 100, (1, t))
    ids[0, 1:1 + n_image_tokens] = CFG.img_context_token_id
    return ids


@pytest.mark.parametrize("shape", [(1, 3, 28, 28), (1, 1, 56, 56), (3, 56, 56), (1, 3, 56, 42)])
def test_pixel_values_of_the_wrong_shape(model, shape):
    with pytest.raises(ValueError) as err:
        model(_ids(4), pixel_values=torch.randn(shape))
    assert "[N, 3, 56, 56]" in str(err.value) and str(list(shape)) in str(err.value)
    assert "image_size" in str(err.value)


@pytest.mark.parametrize("n_tokens, n_tiles", [(4, 0), (3, 1), (4, 2), (0, 1)])
def test_image_token_count_must_match_the_tiles(model, n_tokens, n_tiles):
    pixels = torch.randn(n_tiles, 3, 56, 56) if n_tiles else None
    with pytest.raises(ValueError) as err:
        model(_ids(n_tokens), pixel_values=pixels)
    msg = str(err.value)
    assert f"{n_tokens} <IMG_CONTEXT> tokens" in msg and f"{n_tiles} tiles" in msg
    assert f"= {n_tiles * CFG.tokens_per_tile}" in msg


def test_empty_pixel_tensor_for_text_only_batch_is_fine(model):
    out = model(_ids(0), pixel_values=torch.zeros(0, 3, 56, 56))
    assert out.logits.shape == (1, 12, CFG.vocab_size)


@pytest.mark.parametrize("key", ["position_ids", "seq_ids", "labels", "kind_ids"])
def test_side_tensors_must_match_input_ids(model, key):
    with pytest.raises(ValueError, match=f"{key} must have the shape of input_ids \\[1, 12\\]"):
        model(_ids(0), **{key: torch.zeros(1, 11, dtype=torch.long)})


def test_unknown_attention_implementation():
    model = MonoInternVL(tiny_model_config(attn_impl="flash3"))
    with pytest.raises(ValueError, match="attn_impl='flash3'"):
        model(_ids(0))


def test_flash_requested_where_it_cannot_run():
    model = MonoInternVL(tiny_model_config(attn_impl="flash"))
    with pytest.raises(RuntimeError, match="attn_impl='flash'"):
        model(_ids(0))
