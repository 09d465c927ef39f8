"""The real SmolLM2-135M-Instruct (GGUF, dequantised by transformers): upcycled logits == transformers'."""
from __future__ import annotations

import pytest
import torch

from evip.model.weights import load_pretrained_llm

TEXT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp, "
        "and the ships at sea were guided safely into the harbour.")


@pytest.fixture(scope="session")
def smollm2_pair(smollm2_path):
    """(transformers' model, our upcycled model, our tokenizer): each loaded once per session."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                               dtype=torch.float32).eval()
    ours, tok = load_pretrained_llm(smollm2_path, {"image_size": 448, "vision_hidden_size": 1024}, seed=0)
    return ref, ours.eval(), tok


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_pair):
    ref, ours, tok = smollm2_pair
    ids = torch.tensor([tok(TEXT).input_ids])
    assert ids.shape[1] > 20
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids).logits
    base = expected.shape[-1]
    assert got.shape[-1] == ours.cfg.vocab_size == base + 9
    torch.testing.assert_close(got[..., :base], expected, atol=1e-4, rtol=0)
    # a real LM: the next token is predictable on English prose
    nll = torch.nn.functional.cross_entropy(got[0, :-1, :base], ids[0, 1:])
    assert nll.exp() < 100


@pytest.mark.slow
def test_smollm2_upcycled_shape(smollm2_pair):
    ref, ours, tok = smollm2_pair
    cfg = ours.cfg
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (576, 30, 9, 3)
    assert cfg.tie_word_embeddings and ours.output is None
    assert cfg.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>") >= 49152
    assert cfg.tokens_per_tile == 256


@pytest.mark.slow
def test_cached_hf_directory_builds_the_same_model_as_the_gguf(smollm2_pair, smollm2_dir):
    """`smollm2` (the named asset the demo uses) is the GGUF converted once to an HF directory:
    the model upcycled from it and its tokenizer must be the GGUF's, bit for bit."""
    _, from_gguf, tok_gguf = smollm2_pair
    from_dir, tok_dir = load_pretrained_llm(smollm2_dir, {"image_size": 448, "vision_hidden_size": 1024}, seed=0)
    assert from_dir.cfg == from_gguf.cfg
    a, b = from_dir.state_dict(), from_gguf.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])] == []
    assert tok_dir.get_vocab() == tok_gguf.get_vocab() and tok_dir.chat_template == tok_gguf.chat_template
    chat = tok_gguf.apply_chat_template([{"role": "user", "content": "What colour is it? <image>"}],
                                        tokenize=False, add_generation_prompt=True)
    assert tok_dir(chat + TEXT).input_ids == tok_gguf(chat + TEXT).input_ids
