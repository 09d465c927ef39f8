"""The released Mono-InternVL-2B layout: its state-dict key names, `wqkv` packing and config.json.

    ours                                   released (InternVLChatModel + InternLM2VEForCausalLM)
    vision.patch_embedding.*               vision_model.embeddings.patch_embedding.*
    vision.{class,position}_embedding      vision_model.embeddings.{class,position}_embedding
    mlp1.{0,1,3}.*                         mlp1.{0,1,3}.*
    tok_embeddings.weight                  language_model.model.tok_embeddings.weight
    layers.i.attention.{q,k,v}_proj.*      language_model.model.layers.i.attention.wqkv.*  (packed per KV group)
    layers.i.attention.o_proj.weight       language_model.model.layers.i.attention.wo.weight
    layers.i.attention_ve.*                language_model.model.layers.i.attention_ve.{wqkv,wo}.*  (ours: 1.5-style)
    layers.i.{attention_norm,ffn_norm}     language_model.model.layers.i.{attention_norm,ffn_norm}.weight
    layers.i.feed_forward{,_ve}.w{1,2,3}   language_model.model.layers.i.feed_forward{,_ve}.w{1,2,3}.weight
    norm.weight                            language_model.model.norm.weight
    output.weight                          language_model.output.weight
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


def to_released(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the released layout (q/k/v packed into wqkv)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _ATTN.match(name)
        if m and m.group(3) in _QKV:
            if m.group(3) == "q":
                qkv = [state[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
                out[released_key(name)] = pack_wqkv(*qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            continue
        out[released_key(name)] = t
    return out


def released_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the released InternVLChatModel, filled from `cfg`."""
    llm = {
        "architectures": ["InternLM2VEForCausalLM"], "model_type": "internlm2", "bias": False,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_word_embeddings, "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    # Not in the release, written only when they differ from what InternLM2 implies:
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        llm["head_dim"] = cfg.head_dim
    if cfg.attention_bias:
        llm["qkv_bias"] = True
    if cfg.visual_attention_experts:
        llm["visual_attention_experts"] = True
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "downsample_ratio": cfg.downsample_ratio, "force_image_size": cfg.image_size, "ps_version": "v2",
        "select_layer": -1, "template": "internlm2-chat", "torch_dtype": llm["torch_dtype"],
        "img_context_token_id": cfg.img_context_token_id,
        "llm_config": llm,
        "vision_config": {"architectures": ["InternVisionPatchModel"], "hidden_size": cfg.vision_hidden_size,
                          "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": 3},
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
                max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Export in the released layout: safetensors (sharded when large) + config.json (+ tokenizer)."""
    cfg = cfg if cfg is not None else model.cfg
    if not cfg.has_visual_ffn:
        raise ValueError("model.visual_ffn=none (the no-expert ablation) has no visual FFN experts, and the "
                         "Mono-InternVL layout needs one per layer: export a model trained with visual experts")
    directory = Path(directory)
    state = {k: v for k, v in model.state_dict().items() if k in dict(model.named_parameters())}
    released = to_released(state, cfg)
    dtype = next(iter(state.values())).dtype
    write_safetensors(released, directory, max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(released_config(cfg, dtype), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
