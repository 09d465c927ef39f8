"""`ModelConfig` from a pretrained LLM's HF config (Llama, Qwen2, InternLM2).

The language-model shape comes from the HF config; the vision / tile / expert settings are ours
and are passed in (`vision`), since a text LLM has none.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from evip.model.config import ModelConfig

# model_type -> the HF architecture class names that share its weight layout
SUPPORTED_FAMILIES = {
    "llama": ("LlamaForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "internlm2": ("InternLM2ForCausalLM", "InternLM2VEForCausalLM"),
}

# ModelConfig fields that come from the LLM's config: `vision` may not set them.
LLM_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "rope_scaling_factor",
              "rms_norm_eps", "max_position_embeddings",
              "attention_bias", "tie_word_embeddings", "pad_token_id")
OURS_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in LLM_FIELDS)


class UnsupportedArchitectureError(ValueError):
    """The checkpoint is not a Llama / Qwen2 / InternLM2 causal LM (or uses a feature we lack)."""


def supported_text() -> str:
    return ", ".join(f"{t} ({'/'.join(a)})" for t, a in SUPPORTED_FAMILIES.items())


def detect_family(hf: Mapping[str, Any], source: str = "config") -> str:
    """The family ('llama', 'qwen2', 'internlm2') of an HF config dict; a clear error otherwise."""
    model_type = str(hf.get("model_type") or "").lower()
    if model_type in SUPPORTED_FAMILIES:
        return model_type
    for arch in hf.get("architectures") or ():
        for family, names in SUPPORTED_FAMILIES.items():
            if arch in names:
                return family
    raise UnsupportedArchitectureError(
        f"unsupported architecture in {source}: model_type={hf.get('model_type')!r}, "
        f"architectures={hf.get('architectures')!r}; supported: {supported_text()}")


def _rope(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """rope_theta, rope_scaling and rope_scaling_factor of an HF config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return dict(rope_theta=theta, rope_scaling="none", rope_scaling_factor=1.0)
    # "dynamic" (NTK): InternLM2's and HF Llama's; the base grows for every position once a
    # sequence is longer than max_position_embeddings (evip/model/rope.py).
    if rope_type != "dynamic":
        raise UnsupportedArchitectureError(
            f"unsupported RoPE scaling {rope_type!r} in {source}: implemented are plain RoPE (configurable "
            "theta) and 'dynamic' NTK scaling")
    factor = params.get("factor", scaling.get("factor"))
    if factor is None or float(factor) < 1.0:
        raise UnsupportedArchitectureError(f"RoPE scaling 'dynamic' in {source} needs a factor >= 1, got {factor!r}")
    return dict(rope_theta=theta, rope_scaling="dynamic", rope_scaling_factor=float(factor))


def _check_features(family: str, hf: Mapping[str, Any], source: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"hidden_act={act!r} in {source}: only SwiGLU with silu is supported")
    if family == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise UnsupportedArchitectureError(
            f"Llama with attention_bias/mlp_bias in {source}: biases on o_proj or the MLP are not supported "
            "(only Qwen2-style q/k/v biases are)")
    if family == "qwen2" and hf.get("use_sliding_window"):
        raise UnsupportedArchitectureError(f"Qwen2 with use_sliding_window=true in {source} is not supported")
    if family == "internlm2" and hf.get("bias"):
        raise UnsupportedArchitectureError(
            f"InternLM2 with bias=true in {source}: a bias on wo is not supported")


def model_config_from_hf(hf: Mapping[str, Any] | Any, vision: Mapping[str, Any] | None = None,
                         source: str = "config") -> ModelConfig:
    """Build a ModelConfig from an HF config (a dict or a `PretrainedConfig`) plus our settings.

    `vision` may set any ModelConfig field that is not the LLM's shape: image_size, patch_size,
    vision_hidden_size, downsample_ratio, visual_attention_experts, img_context_token_id,
    attn_impl, activation_checkpointing.
    """
    if not isinstance(hf, Mapping):
        hf = hf.to_dict()
    family = detect_family(hf, source)
    _check_features(family, hf, source)
    rope = _rope(hf, source)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if hf.get(k) is None]
    if missing:
        raise ValueError(f"{source} lacks required LLM config keys {missing}")
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    pad = hf.get("pad_token_id")
    llm = dict(
        vocab_size=int(hf["vocab_size"]), hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        **rope, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        attention_bias=family == "qwen2", tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=int(pad) if isinstance(pad, int) else 0,
    )
    ours = dict(vision or {})
    bad = sorted(set(ours) - set(OURS_FIELDS))
    if bad:
        raise ValueError(f"vision settings {bad} are not allowed: the LLM's config fixes them; "
                         f"allowed keys: {', '.join(OURS_FIELDS)}")
    return ModelConfig(**llm, **ours)
