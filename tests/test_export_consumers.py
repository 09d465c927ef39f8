"""The export is what Mono-InternVL's consumers load as Mono-InternVL: the released modelling code
(trust_remote_code), vLLM and LMDeploy.

CONSUMER_READS lists the config.json keys they read, derived from reading their public code:
- official: OpenGVLab/Mono-InternVL internvl/model/internvl_chat/configuration_internvl_chat.py
  (InternVLChatConfig: indexes vision_config['model_type'] and llm_config['architectures'][0]),
  .../modeling_internvl_chat.py (image size, patch size, hidden sizes, vision model by model_type),
  .../modeling_intern_vit.py (InternVisionEmbeddings), internvl/model/internlm2/configuration_internlm2.py
  (rope_scaling must be {type, factor: float >= 1}) and modeling_internlm2_ve.py (layer shapes, rope);
- vLLM: vllm-project/vllm vllm/model_executor/models/internvl.py (tiling, pixel shuffle, patch-only
  vision for an InternLM2VEForCausalLM LLM), internlm2.py and internlm2_ve.py (head_dim = hidden /
  heads, wqkv without bias, silu only, rope_scaling via get_rope, tie_word_embeddings);
- LMDeploy (<= v0.14; InternLM/lmdeploy 2266f48b removed Mono-InternVL in v0.15):
  lmdeploy/pytorch/models/internvl.py (is_mono from llm_config.architectures[0], asserts
  select_layer == -1, no fp16), lmdeploy/vl/model/internvl.py (dynamic_image_size, force_image_size //
  patch_size, min/max_dynamic_patch, use_thumbnail), lmdeploy/pytorch/configurations/default.py
  (llm_config bos/eos ids), lmdeploy/pytorch/models/internlm2_ve.py (rope_scaling type/factor).
The `*_view` functions below re-state, in our own words, the decisions those loaders take on the
config; the tests assert the export makes each of them build Mono-InternVL fed as it was trained.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model_config
from test_weights_mono2b import random_model, released_config
from weights_helpers import hf_llm, internlm2_wqkv, save_hf, tiny_tokenizer

from evip.model.mono2b_layout import NotExportableError, load_mono2b, save_mono2b
from evip.model.serving import ServingConfig
from evip.model.weights import load_pretrained_llm

TOP = ("architectures", "model_type", "auto_map", "torch_dtype", "template", "downsample_ratio",
       "force_image_size", "ps_version", "select_layer", "pad2square", "use_backbone_lora", "use_llm_lora",
       "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch")
LLM = ("architectures", "model_type", "auto_map", "bias", "hidden_act", "hidden_size", "intermediate_size",
       "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
       "rope_scaling", "max_position_embeddings", "vocab_size", "tie_word_embeddings", "pad_token_id",
       "bos_token_id", "eos_token_id", "torch_dtype")
VISION = ("model_type", "architectures", "hidden_size", "image_size", "patch_size")
CONSUMER_READS = [(k,) for k in TOP] + [("llm_config", k) for k in LLM] + [("vision_config", k) for k in VISION]


def official_view(config: dict) -> dict:
    """What the released InternVLChatConfig / InternVLChatModel build from `config` (defaults included)."""
    vision, llm = config.get("vision_config") or {}, config.get("llm_config") or {}
    vision_model = "InternVisionPatchModel" if vision["model_type"] == "intern_vit_patch" else "InternVisionModel"
    llm_class = {"LlamaForCausalLM": "LlamaForCausalLM", "InternLM2ForCausalLM": "InternLM2ForCausalLM",
                 "InternLM2VEForCausalLM": "InternLM2VEForCausalLM",
                 "Qwen2ForCausalLM": "Qwen2ForCausalLM"}[llm["architectures"][0]]
    scaling = llm.get("rope_scaling")
    if scaling is not None:      # InternLM2Config's validation
        assert isinstance(scaling, dict) and set(scaling) == {"type", "factor"}, scaling
        assert scaling["type"] in ("linear", "dynamic") and isinstance(scaling["factor"], float), scaling
        assert scaling["factor"] >= 1.0
    size = config.get("force_image_size") or vision.get("image_size", 224)
    ratio = config.get("downsample_ratio", 0.5)
    return dict(vision_model=vision_model, llm=llm_class, ps_version=config.get("ps_version", "v1"),
                select_layer=config.get("select_layer", -4),
                image_tokens=int((size // vision.get("patch_size", 14)) ** 2 * ratio ** 2),
                tiling=(config.get("dynamic_image_size", False), config.get("min_dynamic_patch", 1),
                        config.get("max_dynamic_patch", 6), config.get("use_thumbnail", False)),
                rope=(llm.get("rope_theta", 10000), scaling), bias=llm.get("bias", True),
                head_dim=llm["hidden_size"] // llm["num_attention_heads"],
                tied=llm.get("tie_word_embeddings", False),
                special=(llm.get("bos_token_id", 1), llm.get("eos_token_id", 2), llm.get("pad_token_id", 0)))


def vllm_view(config: dict) -> dict:
    """vLLM's InternVL: patch-only vision when the LLM is InternLM2-VE; tiles per the config."""
    llm = config["llm_config"]
    assert llm["hidden_act"] == "silu"
    dynamic = config["dynamic_image_size"]
    # its processor asserts these types
    assert isinstance(dynamic, bool) and isinstance(config["use_thumbnail"], bool)
    assert isinstance(config["min_dynamic_patch"], int) and isinstance(config["max_dynamic_patch"], int)
    return dict(mono=llm["architectures"][0] == "InternLM2VEForCausalLM",
                tiles=(config["min_dynamic_patch"] if dynamic else 1, config["max_dynamic_patch"] if dynamic else 1),
                thumbnail=config["use_thumbnail"], image_size=config["vision_config"]["image_size"],
                head_dim=llm["hidden_size"] // llm["num_attention_heads"], rope_scaling=llm.get("rope_scaling"))


def lmdeploy_view(config: dict) -> dict:
    """LMDeploy's pytorch engine and VL preprocessor."""
    assert config["architectures"][0] == "InternVLChatModel"
    assert config["select_layer"] == -1
    llm = config["llm_config"]
    tokens = int((config["force_image_size"] // config["vision_config"]["patch_size"]) ** 2
                 * config["downsample_ratio"] ** 2)
    return dict(mono=llm["architectures"][0] == "InternLM2VEForCausalLM", image_tokens=tokens,
                dynamic=config.get("dynamic_image_size", False),
                tiles=(config["min_dynamic_patch"], config["max_dynamic_patch"], config["use_thumbnail"]),
                stop=(llm["bos_token_id"], llm["eos_token_id"]), fp16=llm["torch_dtype"] == "float16")


def _get(config: dict, path: tuple[str, ...]):
    for k in path:
        config = config[k]
    return config


def _exported(tmp_path, serving=ServingConfig(min_dynamic_patch=2, max_dynamic_patch=9, use_thumbnail=False),
              **overrides) -> tuple[dict, object]:
    model = random_model(**overrides).to(torch.bfloat16)
    tok = tiny_tokenizer(120)
    tok.add_special_tokens({"bos_token": "w3", "eos_token": "w4"})
    save_mono2b(model, tmp_path, tokenizer=tok, serving=serving)
    return json.loads((tmp_path / "config.json").read_text()), model.cfg


def test_export_has_every_key_the_consumers_read_with_the_release_types(tmp_path):
    config, cfg = _exported(tmp_path, rope_scaling="dynamic", rope_scaling_factor=2.0)
    release = released_config(cfg)
    for path in CONSUMER_READS:
        assert type(_get(config, path)) is type(_get(release, path)), path
    missing = [p for p in CONSUMER_READS if _get(config, p) is None]
    assert missing == [], missing
    for key in ("qkv_bias", "head_dim", "visual_attention_experts"):      # read by no consumer
        assert key not in config["llm_config"]


def test_consumers_build_mono_internvl_fed_as_trained(tmp_path):
    config, cfg = _exported(tmp_path, rope_scaling="dynamic", rope_scaling_factor=2.0)
    official = official_view(config)
    assert official == dict(
        vision_model="InternVisionPatchModel", llm="InternLM2VEForCausalLM", ps_version="v2", select_layer=-1,
        image_tokens=cfg.tokens_per_tile, tiling=(True, 2, 9, False),
        rope=(cfg.rope_theta, {"type": "dynamic", "factor": 2.0}), bias=False, head_dim=cfg.head_dim,
        tied=False, special=(5, 6, cfg.pad_token_id))   # w3, w4
    assert vllm_view(config) == dict(mono=True, tiles=(2, 9), thumbnail=False, image_size=cfg.image_size,
                                     head_dim=cfg.head_dim, rope_scaling={"type": "dynamic", "factor": 2.0})
    assert lmdeploy_view(config) == dict(mono=True, image_tokens=cfg.tokens_per_tile, dynamic=True,
                                         tiles=(2, 9, False), stop=(5, 6), fp16=False)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 5, "eos_token_id": [6], "pad_token_id": cfg.pad_token_id}
    # the export before this fix: no vision model_type -> the official config raises KeyError
    del config["vision_config"]["model_type"]
    with pytest.raises(KeyError, match="model_type"):
        official_view(config)


def test_plain_rope_exports_no_scaling(tmp_path):
    config, _ = _exported(tmp_path)
    assert config["llm_config"]["rope_scaling"] is None and official_view(config)["rope"][1] is None


def _smollm2_like(tmp_path):
    """A tiny LlamaForCausalLM shaped like SmolLM2 (tied head, 3 query heads per KV head), upcycled."""
    llama = hf_llm("llama", num_attention_heads=6, num_key_value_heads=2, hidden_size=96, tie_word_embeddings=True,
                   rope_theta=100000.0)
    src = save_hf(llama, tmp_path / "llama")
    model, tok = load_pretrained_llm(src, {"image_size": 56, "patch_size": 14, "vision_hidden_size": 32}, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():               # trained-looking vision and visual experts (not copies / ~0)
        for name, p in model.named_parameters():
            if name.startswith(("vision.", "mlp1.")) or ".feed_forward_ve." in name:
                p.copy_(0.3 * torch.randn_like(p))
    return llama, model.eval(), tok


def test_smollm2_like_model_exports_as_internlm2_ve_with_equal_logits(tmp_path):
    llama, model, tok = _smollm2_like(tmp_path)
    cfg = model.cfg
    assert cfg.tie_word_embeddings and model.output is None
    n = cfg.tokens_per_tile
    ids = torch.tensor([[5, 9, 11] + [cfg.img_context_token_id] * (2 * n) + [7, 3, 8, 2]])   # text, 2 tiles, text
    pixels = torch.randint(0, 256, (2, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids, pixel_values=pixels).logits
    out = save_mono2b(model, tmp_path / "export", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["llm_config"]["architectures"] == ["InternLM2VEForCausalLM"]
    assert config["llm_config"]["tie_word_embeddings"] is False
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        # wqkv in InternLM2's grouped layout, packed here from the HF Llama's own q/k/v
        sd = llama.state_dict()
        want = internlm2_wqkv(*(sd[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"),
                              cfg.num_kv_heads, cfg.head_dim)
        assert torch.equal(f.get_tensor("language_model.model.layers.1.attention.wqkv.weight"), want)
        assert torch.equal(f.get_tensor("language_model.output.weight")[:llama.config.vocab_size],
                           sd["model.embed_tokens.weight"])
    assert "language_model.output.weight" in keys and not any("_proj" in k or "lm_head" in k for k in keys)
    loaded, loaded_cfg = load_mono2b(out)
    assert not loaded_cfg.tie_word_embeddings and loaded.output is not None
    with torch.no_grad():
        after = loaded.eval()(ids, pixel_values=pixels).logits
    assert torch.equal(before, after)
    image = ids[0] == cfg.img_context_token_id
    assert image.any() and (~image).any()      # both kinds of positions compared


def test_qwen2_with_qkv_biases_is_refused(tmp_path):
    qwen = hf_llm("qwen2")
    src = save_hf(qwen, tmp_path / "qwen2")
    model, tok = load_pretrained_llm(src, {"image_size": 56, "patch_size": 14, "vision_hidden_size": 32}, seed=0)
    with pytest.raises(NotExportableError, match=r"q/k/v biases .*Qwen2.*Llama-family or InternLM2"):
        save_mono2b(model, tmp_path / "export", tokenizer=tok)
    assert not (tmp_path / "export").exists()


def test_unknown_rope_scaling_is_refused_at_import():
    from evip.model.hf_config import UnsupportedArchitectureError, model_config_from_hf
    llama = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
    cfg = model_config_from_hf({**llama, "rope_scaling": {"type": "dynamic", "factor": 4.0}})
    assert (cfg.rope_scaling, cfg.rope_scaling_factor) == ("dynamic", 4.0)
    with pytest.raises(UnsupportedArchitectureError, match="'linear'"):
        model_config_from_hf({**llama, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert tiny_model_config().rope_scaling == "none"


def test_exported_tokenizer_json_is_readable_by_the_released_codes_tokenizers(tmp_path, tmp_path_factory):
    """tokenizers >= 0.20 saves BPE merges as pairs, which the tokenizers pinned by the released code
    (0.15) cannot parse; the export writes them as "a b" strings, which both read to the same ids
    (tests/test_export_official.py loads it under 0.15 when that stack is given)."""
    from tokenizers import Tokenizer
    from trainer_helpers import prepared_tokenizer
    from transformers import AutoTokenizer

    from evip.model.serving import ServingConfig, save_serving_files

    tok = AutoTokenizer.from_pretrained(str(prepared_tokenizer(tmp_path_factory.getbasetemp())))
    tok.save_pretrained(str(tmp_path / "plain"))
    merges = json.loads((tmp_path / "plain" / "tokenizer.json").read_text())["model"]["merges"]
    assert isinstance(merges[0], list)                                # what this tokenizers writes
    save_serving_files(tok, tmp_path / "export", ServingConfig(), pad_token_id=0)
    exported = json.loads((tmp_path / "export" / "tokenizer.json").read_text())["model"]["merges"]
    assert exported == [" ".join(pair) for pair in merges]
    text = "A red square on the left, <IMG_CONTEXT> 12 wörlds<|im_end|>\n\tend"
    before = Tokenizer.from_file(str(tmp_path / "plain" / "tokenizer.json")).encode(text).ids
    assert Tokenizer.from_file(str(tmp_path / "export" / "tokenizer.json")).encode(text).ids == before
    assert AutoTokenizer.from_pretrained(str(tmp_path / "export"))(text)["input_ids"] == tok(text)["input_ids"]
