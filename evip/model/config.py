"""The model's typed config: one dataclass, the shape of a Mono-InternVL model.

Defaults are the released Mono-InternVL-2B (InternLM2-1.8B base). Tests and the demo override
them with tiny values; `from_hf_config` in weights.py fills them from a pretrained LLM.
"""
from __future__ import annotations

from dataclasses import dataclass


VISUAL_FFN_INITS = ("copy", "random", "none")
ROPE_SCALINGS = ("none", "dynamic")


@dataclass
class ModelConfig:
    # --- language model (Llama / Qwen2 / InternLM2 family) ---
    vocab_size: int = 92553              # 92544 + the 9 added image/grounding tokens
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    # "dynamic": InternLM2's (and HF Llama's) dynamic NTK scaling: a forward over a sequence longer
    # than max_position_embeddings gets a larger RoPE base, for every position (evip/model/rope.py)
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    attention_bias: bool = False         # Qwen2 has a bias on q/k/v
    tie_word_embeddings: bool = False    # SmolLM2 ties the head to the embedding
    # --- vision: patch embedding + projector, no vision encoder ---
    image_size: int = 448                # one tile, pixels per side
    patch_size: int = 14
    vision_hidden_size: int = 1024       # D of the patch embedding
    downsample_ratio: float = 0.5        # pixel shuffle: 2x2 patches -> one token
    # --- experts ---
    visual_attention_experts: bool = False   # Mono-InternVL-1.5 style, off by default
    # How the visual FFN experts start when a pretrained LLM is upcycled: "copy" of the text FFN
    # (the paper's choice), "random" (normal(0, 0.02), the ablation), or "none": no visual expert
    # at all, image tokens go through the text FFN (the ablation without experts).
    visual_ffn: str = "copy"
    # --- special tokens (set from the tokenizer once the image tokens are added) ---
    img_context_token_id: int = 92546
    pad_token_id: int = 0
    # --- execution ---
    attn_impl: str = "auto"              # auto | sdpa | flex | varlen | flash (evip/model/packed_attention.py)
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.visual_ffn not in VISUAL_FFN_INITS:
            raise ValueError(f"model.visual_ffn={self.visual_ffn!r}: expected one of {', '.join(VISUAL_FFN_INITS)}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling={self.rope_scaling!r}: expected one of {', '.join(ROPE_SCALINGS)}")
        if self.rope_scaling != "none" and self.rope_scaling_factor < 1.0:
            raise ValueError(f"model.rope_scaling_factor={self.rope_scaling_factor}: must be >= 1")

    @property
    def has_visual_ffn(self) -> bool:
        return self.visual_ffn != "none"

    @property
    def grid(self) -> int:
        """Patches per tile side (448 / 14 = 32)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one tile becomes after pixel shuffle (256 for 448 px)."""
        return int(self.grid * self.downsample_ratio) ** 2
