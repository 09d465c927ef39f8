"""Upcycled from real transformers checkpoints: text logits equal the base LLM's (fp32, 1e-5)."""
from __future__ import annotations

import pytest
import torch
from weights_helpers import hf_llm, save_as_internlm2, save_hf, tiny_tokenizer

from evip.model.tokens import SPECIAL_TOKENS
from evip.model.weights import load_pretrained_llm

VISION = {"image_size": 56, "patch_size": 14, "vision_hidden_size": 32}
IDS = torch.tensor([[5, 17, 99, 3, 64, 127, 8, 42, 11, 2, 77, 100]])


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def our_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_text_parity(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.std() > 0.3, "reference logits too flat for a meaningful comparison"
    torch.testing.assert_close(ours[..., : ref.shape[-1]], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,shard,overrides", [("llama", None, {}), ("qwen2", None, {}), ("llama", "60KB", {}),
                                                 ("qwen2", "60KB", {}), ("llama", None, {"head_dim": 32})])
def test_hf_checkpoint_logits_match_transformers(tmp_path, kind, shard, overrides):
    hf = hf_llm(kind, **overrides)
    save_hf(hf, tmp_path, max_shard_size=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model, tok = load_pretrained_llm(tmp_path, VISION, seed=0)
    assert model.cfg.attention_bias == (kind == "qwen2")
    assert_text_parity(our_logits(model), hf_logits(hf))


def test_internlm2_packed_wqkv_matches_llama(tmp_path):
    llama = hf_llm("llama", seed=1)
    save_as_internlm2(llama, tmp_path)
    model, _ = load_pretrained_llm(tmp_path, VISION, seed=0)
    assert_text_parity(our_logits(model), hf_logits(llama))


def test_tied_head_llama(tmp_path):
    hf = hf_llm("llama", tie_word_embeddings=True)
    save_hf(hf, tmp_path)
    model, _ = load_pretrained_llm(tmp_path, VISION, seed=0)
    assert model.output is None
    assert_text_parity(our_logits(model), hf_logits(hf))


def test_upcycling_adds_tokens_experts_and_seeded_vision(tmp_path):
    hf = hf_llm("llama")
    save_hf(hf, tmp_path)                               # tokenizer fills all 128 ids: the vocabulary grows
    model, tok = load_pretrained_llm(tmp_path, VISION, seed=7)
    cfg = model.cfg
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(128, 128 + len(SPECIAL_TOKENS))) and len(tok) == cfg.vocab_size == 137
    assert cfg.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>") == 130
    sd = model.state_dict()
    base_emb = hf.model.embed_tokens.weight.detach()
    mean = base_emb.double().mean(0).float()
    assert torch.equal(sd["tok_embeddings.weight"][:128], base_emb)
    for table, base in (("tok_embeddings.weight", base_emb), ("output.weight", hf.lm_head.weight.detach())):
        torch.testing.assert_close(sd[table][128:], base.double().mean(0).float().expand(9, -1), atol=1e-7, rtol=0)
    assert torch.allclose(sd["tok_embeddings.weight"][130], mean)
    for i in range(2):
        for w in ("w1", "w2", "w3"):
            text, visual = model.layers[i].feed_forward, model.layers[i].feed_forward_ve
            assert torch.equal(getattr(text, w).weight, getattr(visual, w).weight)
            assert getattr(text, w).weight.data_ptr() != getattr(visual, w).weight.data_ptr()
    # The experts train apart: a step on the visual FFN leaves the text FFN as it was.
    before = model.layers[0].feed_forward.w1.weight.clone()
    with torch.no_grad():
        model.layers[0].feed_forward_ve.w1.weight.add_(1.0)
    assert torch.equal(model.layers[0].feed_forward.w1.weight, before)
    # Vision: deterministic in the seed, different across seeds.
    again, _ = load_pretrained_llm(tmp_path, VISION, seed=7)
    other, _ = load_pretrained_llm(tmp_path, VISION, seed=8)
    for name in ("vision.patch_embedding.weight", "vision.position_embedding", "mlp1.1.weight", "mlp1.3.weight"):
        assert torch.equal(again.state_dict()[name], sd[name])
        assert not torch.equal(other.state_dict()[name], sd[name])


def test_upcycled_model_reads_an_image_prompt(tmp_path):
    """Images flow through the upcycled model: image tokens route to the visual experts."""
    hf = hf_llm("llama")
    save_hf(hf, tmp_path)
    model, tok = load_pretrained_llm(tmp_path, VISION, seed=0)
    cfg = model.cfg
    ctx = cfg.img_context_token_id
    start, end = tok.convert_tokens_to_ids(["<img>", "</img>"])
    ids = torch.tensor([[5, start] + [ctx] * cfg.tokens_per_tile + [end, 17, 99]])
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        with_image = model(ids, pixel_values=pixels).logits
        text_only = model(torch.tensor([[5]])).logits
    assert with_image.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(with_image).all()
    torch.testing.assert_close(with_image[:, :1], text_only, atol=1e-5, rtol=0)   # causal: before the image


def test_visual_attention_experts_copied_from_text_attention(tmp_path):
    hf = hf_llm("qwen2")
    save_hf(hf, tmp_path)
    model, _ = load_pretrained_llm(tmp_path, {**VISION, "visual_attention_experts": True}, seed=0)
    sd = model.state_dict()
    keys = [k for k in sd if ".attention_ve." in k]
    assert keys and any(k.endswith("q_proj.bias") for k in keys)
    for k in keys:
        assert torch.equal(sd[k], sd[k.replace(".attention_ve.", ".attention.")])
    assert_text_parity(our_logits(model), hf_logits(hf))


def test_tokenizer_passed_explicitly(tmp_path):
    hf = hf_llm("llama")
    hf.save_pretrained(str(tmp_path))                   # no tokenizer files in the directory
    model, tok = load_pretrained_llm(tmp_path, VISION, tokenizer=tiny_tokenizer(100))
    assert model.cfg.vocab_size == 128 and tok.convert_tokens_to_ids("<img>") == 100   # ids inside the table


def test_bf16_checkpoint_gives_a_bf16_model(tmp_path):
    hf = hf_llm("qwen2").to(torch.bfloat16)
    save_hf(hf, tmp_path)
    model, _ = load_pretrained_llm(tmp_path, VISION)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}   # fresh vision weights included
    as_fp32, _ = load_pretrained_llm(tmp_path, VISION, dtype=torch.float32)
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.layers[0].attention.q_proj.bias, hf.model.layers[0].self_attn.q_proj.bias.float())
