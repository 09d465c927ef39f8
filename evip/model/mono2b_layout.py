"""The released Mono-InternVL-2B layout: its state-dict key names, `wqkv` packing and config.json.

    ours                                   released (InternVLChatModel + InternLM2VEForCausalLM)
    vision.patch_embedding.*               vision_model.embeddings.patch_embedding.*
    vision.{class,position}_embedding      vision_model.embeddings.{class,position}_embedding
    mlp1.{0,1,3}.*                         mlp1.{0,1,3}.*
    tok_embeddings.weight                  language_model.model.tok_embeddings.weight
    layers.i.attention.{q,k,v}_proj.*      language_model.model.layers.i.attention.wqkv.*  (packed per KV group)
    layers.i.attention.o_proj.weight       language_model.model.layers.i.attention.wo.weight
    layers.i.{attention_norm,ffn_norm}     language_model.model.layers.i.{attention_norm,ffn_norm}.weight
    layers.i.feed_forward{,_ve}.w{1,2,3}   language_model.model.layers.i.feed_forward{,_ve}.w{1,2,3}.weight
    norm.weight                            language_model.model.norm.weight
    output.weight                          language_model.output.weight  (a tied head: a copy of the embedding)

A model upcycled from a Llama-family LLM (SmolLM2 included) exports as InternLM2-VE: the same
maths, q/k/v packed into `wqkv`, a tied head untied by copying. What InternLM2-VE cannot hold
exactly is refused (`check_exportable`): q/k/v biases (Qwen2), head_dim != hidden / heads, the
1.5-style visual attention experts. The importer still reads `qkv_bias` / `visual_attention_experts`
/ `head_dim`, which earlier evip exports wrote.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evip.model.config import ModelConfig
from evip.model.hf_config import model_config_from_hf
from evip.model.meta_load import build_empty, materialize
from evip.model.safetensors_io import SafetensorsCheckpoint, write_safetensors
from evip.model.serving import ServingConfig, save_serving_files
from evip.model.tokens import IMG_CONTEXT
from evip.model.wqkv import pack_wqkv, unpack_wqkv

LM = "language_model.model."
_ATTN = re.compile(r"^layers\.(\d+)\.(attention|attention_ve)\.([qkvo])_proj\.(weight|bias)$")
_QKV = {"q": 0, "k": 1, "v": 2}


def released_key(name: str) -> str:
    """Our parameter name -> the released name (q/k/v all map to their packed `wqkv`)."""
    if name.startswith("vision."):
        return "vision_model.embeddings." + name[len("vision."):]
    if name.startswith("mlp1."):
        return name
    if name == "output.weight":
        return "language_model.output.weight"
    m = _ATTN.match(name)
    if m:
        i, attn, proj, kind = m.groups()
        return f"{LM}layers.{i}.{attn}.{'wo' if proj == 'o' else 'wqkv'}.{kind}"
    return LM + name


class NotExportableError(ValueError):
    """The model has a part the Mono-InternVL layout (and so its consumers) cannot represent exactly."""


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse what InternLM2-VE cannot hold exactly: its consumers would load it silently wrong."""
    if not cfg.has_visual_ffn:
        raise NotExportableError(
            "model.visual_ffn=none (the no-expert ablation) has no visual FFN experts, and the Mono-InternVL "
            "layout needs one per layer: export a model trained with visual experts")
    if cfg.attention_bias:
        raise NotExportableError(
            "the model has q/k/v biases (a Qwen2-based LLM), which InternLM2-VE cannot hold: its `bias` key "
            "puts a bias on both wqkv and wo in the official code, and vLLM and LMDeploy build wqkv without "
            "one, so they would drop the biases silently. Train from a Llama-family or InternLM2 LLM to "
            "export, or use the weights with evip (`evip generate`)")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise NotExportableError(
            f"head_dim={cfg.head_dim} x num_heads={cfg.num_heads} != hidden_size={cfg.hidden_size}: InternLM2 "
            "derives head_dim = hidden_size / num_heads (official code, vLLM and LMDeploy), so this attention "
            "shape cannot be exported; use the weights with evip (`evip generate`)")
    if cfg.visual_attention_experts:
        raise NotExportableError(
            "model.visual_attention_experts=true (Mono-InternVL-1.5 style attention_ve): no released "
            "Mono-InternVL code, vLLM or LMDeploy has visual attention experts, so they would drop them; "
            "use the weights with evip (`evip generate`)")


def to_released(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the released layout (q/k/v packed into wqkv; a tied head copied to `output`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _ATTN.match(name)
        if m and m.group(3) in _QKV:
            if m.group(3) == "q":
                qkv = [state[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                out[released_key(name)] = pack_wqkv(*qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            continue
        out[released_key(name)] = t
    if cfg.tie_word_embeddings:   # InternLM2-VE has its own head: the same numbers, stored twice
        out[released_key("output.weight")] = state["tok_embeddings.weight"].clone()
    return out


# The released checkpoints' remote-code entry points: with the released modelling files
# (configuration_internvl_chat.py, modeling_internvl_chat.py, configuration_intern_vit.py,
# modeling_intern_vit.py, configuration_internlm2.py, modeling_internlm2_ve.py, conversation.py)
# copied next to the weights, `AutoModel.from_pretrained(dir, trust_remote_code=True)` builds them.
AUTO_MAP = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
LLM_AUTO_MAP = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModel": "modeling_internlm2_ve.InternLM2VEForCausalLM",
                "AutoModelForCausalLM": "modeling_internlm2_ve.InternLM2VEForCausalLM"}


def released_config(cfg: ModelConfig, dtype: torch.dtype, serving: ServingConfig | None = None,
                    tokenizer: Any = None) -> dict[str, Any]:
    """config.json of the released InternVLChatModel (InternLM2-VE LLM, patch-only vision), filled
    from `cfg`, the tiling the model was trained with (`serving`) and the tokenizer's special ids.
    Which consumer reads which key: tests/test_export_consumers.py."""
    check_exportable(cfg)
    serving = serving or ServingConfig()
    dtype_name = str(dtype).removeprefix("torch.")
    llm = {
        "architectures": ["InternLM2VEForCausalLM"], "model_type": "internlm2", "auto_map": LLM_AUTO_MAP,
        "bias": False, "hidden_act": "silu", "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": ({"type": "dynamic", "factor": float(cfg.rope_scaling_factor)}
                         if cfg.rope_scaling == "dynamic" else None),
        "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": False,       # a tied head is exported as a copy (to_released)
        "pad_token_id": cfg.pad_token_id, "torch_dtype": dtype_name,
    }
    if tokenizer is not None:
        llm["bos_token_id"], llm["eos_token_id"] = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "auto_map": AUTO_MAP,
        "torch_dtype": dtype_name, "template": "internlm2-chat",
        "downsample_ratio": cfg.downsample_ratio, "force_image_size": cfg.image_size, "ps_version": "v2",
        "select_layer": -1, "pad2square": False, "use_backbone_lora": 0, "use_llm_lora": 0,
        "dynamic_image_size": True, "use_thumbnail": serving.use_thumbnail,
        "min_dynamic_patch": serving.min_dynamic_patch, "max_dynamic_patch": serving.max_dynamic_patch,
        "img_context_token_id": cfg.img_context_token_id,     # read by evip's importer (load_mono2b)
        "llm_config": llm,
        "vision_config": {"architectures": ["InternVisionPatchModel"], "model_type": "intern_vit_patch",
                          "hidden_size": cfg.vision_hidden_size, "image_size": cfg.image_size,
                          "patch_size": cfg.patch_size, "num_channels": 3, "torch_dtype": dtype_name},
    }


def config_from_released(config: dict[str, Any], source: str = "config.json",
                         img_context_token_id: int | None = None) -> ModelConfig:
    """ModelConfig from the released config.json (`llm_config` + `vision_config` + top level)."""
    llm = dict(config.get("llm_config") or {})
    if not llm:
        raise ValueError(f"{source} has no 'llm_config': not a Mono-InternVL (InternVLChatModel) config")
    bias = bool(llm.pop("qkv_bias", False))
    experts = bool(llm.pop("visual_attention_experts", False))
    vision_cfg = config.get("vision_config") or {}
    image_size = int(config.get("force_image_size") or vision_cfg.get("image_size", 448))
    ctx = img_context_token_id if img_context_token_id is not None else config.get("img_context_token_id")
    vision = dict(image_size=image_size, patch_size=int(vision_cfg.get("patch_size", 14)),
                  vision_hidden_size=int(vision_cfg.get("hidden_size", 1024)),
                  downsample_ratio=float(config.get("downsample_ratio", 0.5)),
                  visual_attention_experts=experts)
    if ctx is not None:
        vision["img_context_token_id"] = int(ctx)
    cfg = model_config_from_hf(llm, vision, f"{source} (llm_config)")
    return dataclasses.replace(cfg, attention_bias=bias)


def _img_context_id_from_tokenizer_files(directory: Path) -> int | None:
    """The <IMG_CONTEXT> id from tokenizer files, without running the tokenizer's remote code."""
    added = directory / "added_tokens.json"
    if added.is_file():
        ids = json.loads(added.read_text())
        if IMG_CONTEXT in ids:
            return int(ids[IMG_CONTEXT])
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        for i, entry in (json.loads(tok_cfg.read_text()).get("added_tokens_decoder") or {}).items():
            if entry.get("content") == IMG_CONTEXT:
                return int(i)
    return None


def load_mono2b(directory: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, ModelConfig]:
    """Load a checkpoint in the released Mono-InternVL-2B layout (streamed, built on the meta device)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a Mono-InternVL checkpoint needs its config.json")
    cfg = config_from_released(json.loads(config_path.read_text()), str(config_path),
                               _img_context_id_from_tokenizer_files(directory))
    tensors = SafetensorsCheckpoint(directory)
    model = build_empty(cfg)
    packed: dict[str, tuple[torch.Tensor, ...]] = {}  # the current layer's wqkv, unpacked

    def produce(name: str, shape: torch.Size) -> torch.Tensor:
        key = released_key(name)
        m = _ATTN.match(name)
        if not (m and m.group(3) in _QKV):
            return tensors.get(key)
        if key not in packed:
            if len(packed) >= 2:  # weight and bias of one layer's wqkv
                packed.pop(next(iter(packed)))
            packed[key] = unpack_wqkv(tensors.get(key), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        return packed[key][_QKV[m.group(3)]]

    materialize(model, produce, dtype, lambda name: tensors.where(released_key(name)))
    return model, cfg


def save_mono2b(model: nn.Module, directory: str | Path, cfg: ModelConfig | None = None, tokenizer: Any = None,
                max_shard_bytes: int = 5 * 1024**3, serving: ServingConfig | None = None) -> Path:
    """Export in the released layout: safetensors (sharded when large), config.json and, with a
    tokenizer, its files (image tokens, chat template) and generation_config.json. Refuses
    (NotExportableError) a model the layout cannot hold exactly (check_exportable)."""
    cfg = cfg if cfg is not None else model.cfg
    check_exportable(cfg)
    serving = serving or ServingConfig()
    directory = Path(directory)
    state = {k: v for k, v in model.state_dict().items() if k in dict(model.named_parameters())}
    released = to_released(state, cfg)
    dtype = next(iter(state.values())).dtype
    write_safetensors(released, directory, max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(released_config(cfg, dtype, serving, tokenizer), indent=2))
    if tokenizer is not None:
        save_serving_files(tokenizer, directory, serving, cfg.pad_token_id)
    return directory
