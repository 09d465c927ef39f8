"""Pretrained HF causal LMs as tensor sources, with the key map from their names to ours.

Sources: an HF directory (`config.json` + single or sharded safetensors, streamed one tensor at
a time) or a GGUF file (dequantised to fp32 by transformers' GGUF loader).

Our names (evip/model/mono.py)          Llama / Qwen2                      InternLM2
tok_embeddings.weight                   model.embed_tokens.weight          model.tok_embeddings.weight
layers.i.attention_norm.weight          model.layers.i.input_layernorm     model.layers.i.attention_norm
layers.i.attention.{q,k,v}_proj.*       model.layers.i.self_attn.*_proj    model.layers.i.attention.wqkv (packed)
layers.i.attention.o_proj.weight        model.layers.i.self_attn.o_proj    model.layers.i.attention.wo
layers.i.ffn_norm.weight                ...post_attention_layernorm        model.layers.i.ffn_norm
layers.i.feed_forward.{w1,w3,w2}        ...mlp.{gate,up,down}_proj         model.layers.i.feed_forward.{w1,w3,w2}
norm.weight                             model.norm.weight                  model.norm.weight
output.weight                           lm_head.weight                     output.weight
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from evip.model.config import ModelConfig
from evip.model.safetensors_io import MissingTensorError
from evip.model.wqkv import unpack_wqkv

Pick = Callable[[torch.Tensor], torch.Tensor] | None
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LLAMA_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_QKV_INDEX = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def llama_key(name: str) -> str:
    """Our text-LLM parameter name -> its Llama / Qwen2 name."""
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    m = _LAYER.match(name)
    if m:
        i, rest = m.groups()
        if rest in _LLAMA_LAYER:
            return f"model.layers.{i}.{_LLAMA_LAYER[rest]}"
        if rest.startswith("attention."):
            return f"model.layers.{i}.self_attn.{rest[len('attention.'):]}"
    raise KeyError(f"no Llama/Qwen2 name for our parameter '{name}'")


def internlm2_key(name: str, cfg: ModelConfig) -> tuple[str, Pick]:
    """Our text-LLM parameter name -> (InternLM2 name, how to cut our tensor out of it)."""
    if name in ("tok_embeddings.weight", "norm.weight"):
        return f"model.{name}", None
    if name == "output.weight":
        return name, None
    m = _LAYER.match(name)
    if m:
        i, rest = m.groups()
        parts = rest.split(".")
        if parts[0] == "attention" and parts[1] in _QKV_INDEX:
            idx = _QKV_INDEX[parts[1]]
            return (f"model.layers.{i}.attention.wqkv.{parts[2]}",
                    lambda t: unpack_wqkv(t, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)[idx])
        if rest == "attention.o_proj.weight":
            return f"model.layers.{i}.attention.wo.weight", None
        return f"model.layers.{i}.{rest}", None
    raise KeyError(f"no InternLM2 name for our parameter '{name}'")


def hf_key(family: str, name: str, cfg: ModelConfig) -> tuple[str, Pick]:
    if family == "internlm2":
        return internlm2_key(name, cfg)
    return llama_key(name), None


class StateDictSource:
    """Tensors already in memory (a transformers model's state dict); `get` hands them out without copying."""

    fresh = False  # `get` returns the same tensor each time: a visual expert needs its own copy

    def __init__(self, tensors: dict[str, torch.Tensor], described_by: str):
        self._tensors = tensors
        self.described_by = described_by

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def get(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise MissingTensorError(f"tensor '{key}' is missing from {self.described_by}")
        return self._tensors[key]

    def dtype_of(self, key: str) -> torch.dtype:
        return self.get(key).dtype

    def where(self, key: str) -> str:
        return self.described_by


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an HF model directory needs config.json")
    return json.loads(path.read_text())


def load_gguf_model(path: Path) -> tuple[Any, Any]:
    """(transformers model in fp32, tokenizer) of a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return hf, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_gguf(path: Path) -> tuple[dict[str, Any], StateDictSource, Any]:
    """(HF config dict, tensors, tokenizer) of a GGUF file, through transformers (fp32)."""
    hf, tokenizer = load_gguf_model(path)
    config = hf.config.to_dict()
    tensors = dict(hf.state_dict())
    del hf  # the tensors live on in `tensors` only: assigned to our model without a copy
    return config, StateDictSource(tensors, f"GGUF file {path}"), tokenizer
