"""The released Mono-InternVL-2B layout: export -> import is bit-exact; a checkpoint written with
the released key names (hand-written here) loads."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from conftest import tiny_model_config
from safetensors.torch import save_file
from weights_helpers import internlm2_wqkv, tiny_tokenizer

from evip.model.mono import MonoInternVL
from evip.model.mono2b_layout import NotExportableError, load_mono2b, save_mono2b


def random_model(**overrides) -> MonoInternVL:
    torch.manual_seed(0)
    model = MonoInternVL(tiny_model_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()     # every tensor distinct, biases and norms included
    return model


@pytest.mark.parametrize("overrides,shard", [({}, 10**9), ({}, 40_000),
                                             ({"rope_scaling": "dynamic", "rope_scaling_factor": 2.0}, 40_000)])
def test_export_import_bit_exact(tmp_path, overrides, shard):
    model = random_model(**overrides)
    save_mono2b(model, tmp_path, max_shard_bytes=shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard < 10**9)
    loaded, cfg = load_mono2b(tmp_path)
    assert cfg == model.cfg
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_tied_head_exports_as_a_copy(tmp_path):
    """InternLM2-VE has its own head: a tied model (SmolLM2) exports `output` as a copy of the
    embedding and reloads untied, every tensor (and so every logit) the same."""
    model = random_model(tie_word_embeddings=True)
    save_mono2b(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["llm_config"]["tie_word_embeddings"] is False
    loaded, cfg = load_mono2b(tmp_path)
    assert cfg == dataclasses.replace(model.cfg, tie_word_embeddings=False)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(theirs) == set(ours) | {"output.weight"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(theirs["output.weight"], ours["tok_embeddings.weight"])
    assert theirs["output.weight"].data_ptr() != theirs["tok_embeddings.weight"].data_ptr()


@pytest.mark.parametrize("overrides,why", [
    ({"attention_bias": True}, "q/k/v biases"),
    ({"visual_attention_experts": True}, "visual_attention_experts=true"),
    ({"head_dim": 8}, "head_dim=8 x num_heads=4 != hidden_size=64"),
    ({"visual_ffn": "none"}, "model.visual_ffn=none")])
def test_unrepresentable_models_are_refused_before_writing(tmp_path, overrides, why):
    """What InternLM2-VE cannot hold exactly would load silently wrong in the official code, vLLM or
    LMDeploy: refused with the cause, and nothing is written."""
    torch.manual_seed(0)
    model = MonoInternVL(tiny_model_config(**overrides))
    with pytest.raises(NotExportableError, match=re.escape(why)):
        save_mono2b(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_bf16_with_tokenizer(tmp_path):
    model = random_model().to(torch.bfloat16)
    tok = tiny_tokenizer(120)
    save_mono2b(model, tmp_path, tokenizer=tok)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["llm_config"]["torch_dtype"] == "bfloat16" and (tmp_path / "tokenizer.json").is_file()
    loaded, _ = load_mono2b(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert next(loaded.parameters()).dtype == torch.bfloat16
    as_fp32, _ = load_mono2b(tmp_path, dtype=torch.float32)
    assert next(as_fp32.parameters()).dtype == torch.float32


def released_config(cfg) -> dict:
    """config.json as the Mono-InternVL-2B release writes it, every key the consumers read
    (tests/test_export_consumers.py) with the release's types; shapes from `cfg`. The vision model is
    the patch-only `intern_vit_patch` (`intern_vit_6b` would build a 48-layer InternViT); the LLM
    InternLM2-VE with dynamic NTK rope."""
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "torch_dtype": "bfloat16", "template": "internlm2-chat", "downsample_ratio": 0.5,
        "force_image_size": cfg.image_size, "ps_version": "v2", "select_layer": -1, "pad2square": False,
        "use_backbone_lora": 0, "use_llm_lora": 0, "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": 1, "max_dynamic_patch": 6,
        "llm_config": {"architectures": ["InternLM2VEForCausalLM"], "model_type": "internlm2",
                       "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                                    "AutoModel": "modeling_internlm2_ve.InternLM2VEForCausalLM",
                                    "AutoModelForCausalLM": "modeling_internlm2_ve.InternLM2VEForCausalLM"},
                       "bias": False, "hidden_act": "silu", "hidden_size": cfg.hidden_size,
                       "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
                       "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
                       "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
                       "max_position_embeddings": cfg.max_position_embeddings,
                       "rope_scaling": {"type": "dynamic", "factor": 2.0}, "vocab_size": cfg.vocab_size,
                       "tie_word_embeddings": False, "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2,
                       "torch_dtype": "bfloat16"},
        "vision_config": {"architectures": ["InternVisionPatchModel"], "model_type": "intern_vit_patch",
                          "hidden_size": cfg.vision_hidden_size, "image_size": cfg.image_size,
                          "patch_size": cfg.patch_size, "num_channels": 3, "torch_dtype": "bfloat16"},
    }


def released_tensors(cfg, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors under the released key names (the spec's list), shapes of `cfg`."""
    D, H, F, V, hd = cfg.vision_hidden_size, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    p, n = cfg.patch_size, 1 + cfg.grid ** 2
    shapes = {
        "vision_model.embeddings.patch_embedding.weight": (D, 3, p, p),
        "vision_model.embeddings.patch_embedding.bias": (D,),
        "vision_model.embeddings.class_embedding": (1, 1, D),
        "vision_model.embeddings.position_embedding": (1, n, D),
        "mlp1.0.weight": (4 * D,), "mlp1.0.bias": (4 * D,), "mlp1.1.weight": (H, 4 * D), "mlp1.1.bias": (H,),
        "mlp1.3.weight": (H, H), "mlp1.3.bias": (H,),
        "language_model.model.tok_embeddings.weight": (V, H),
        "language_model.model.norm.weight": (H,),
        "language_model.output.weight": (V, H),
    }
    for i in range(cfg.num_layers):
        L = f"language_model.model.layers.{i}."
        shapes[L + "attention.wqkv.weight"] = ((cfg.num_heads + 2 * cfg.num_kv_heads) * hd, H)
        shapes[L + "attention.wo.weight"] = (H, cfg.num_heads * hd)
        for ffn in ("feed_forward", "feed_forward_ve"):
            shapes.update({L + f"{ffn}.w1.weight": (F, H), L + f"{ffn}.w3.weight": (F, H), L + f"{ffn}.w2.weight": (H, F)})
        shapes.update({L + "attention_norm.weight": (H,), L + "ffn_norm.weight": (H,)})
    return {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}


def test_checkpoint_with_released_key_names_loads(tmp_path):
    cfg = tiny_model_config(vocab_size=140)
    tensors = released_tensors(cfg, torch.Generator().manual_seed(0))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(released_config(cfg)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"131": {"content": "<IMG_CONTEXT>", "special": True}}}))
    model, loaded_cfg = load_mono2b(tmp_path)
    assert loaded_cfg == dataclasses.replace(cfg, img_context_token_id=131, pad_token_id=2, rope_scaling="dynamic",
                                             rope_scaling_factor=2.0)
    sd = model.state_dict()
    assert torch.equal(sd["tok_embeddings.weight"], tensors["language_model.model.tok_embeddings.weight"])
    assert torch.equal(sd["vision.position_embedding"], tensors["vision_model.embeddings.position_embedding"])
    assert torch.equal(sd["layers.1.feed_forward_ve.w2.weight"],
                       tensors["language_model.model.layers.1.feed_forward_ve.w2.weight"])
    assert torch.equal(sd["output.weight"], tensors["language_model.output.weight"])
    q, k, v = (sd[f"layers.0.attention.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(internlm2_wqkv(q, k, v, cfg.num_kv_heads, cfg.head_dim),
                       tensors["language_model.model.layers.0.attention.wqkv.weight"])
    # and it runs: an image prompt through the loaded model
    ids = torch.tensor([[5] + [131] * cfg.tokens_per_tile + [7]])
    with torch.no_grad():
        out = model.float()(ids, pixel_values=torch.randn(1, 3, cfg.image_size, cfg.image_size))
    assert torch.isfinite(out.logits).all()


def test_loaded_model_owns_its_memory(tmp_path):
    """Overwriting the checkpoint in place (export over the source) leaves a loaded model intact."""
    first = random_model()
    save_mono2b(first, tmp_path)
    loaded, _ = load_mono2b(tmp_path)
    torch.manual_seed(1)
    save_mono2b(MonoInternVL(first.cfg), tmp_path)      # different weights, same files
    for (name, a), b in zip(first.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
