"""Weights: build Mono-InternVL from a pretrained LLM (upcycling), and the released 2B layout.

    model, tok = load_pretrained_llm("path/to/hf_dir_or_model.gguf", vision={"image_size": 448}, seed=0)
    model, cfg = load_mono2b("path/to/Mono-InternVL-2B")       # released layout (evip/model/mono2b_layout.py)
    save_mono2b(model, "out/", tokenizer=tok)

Loading builds the model on the meta device and materialises each parameter once, streaming
tensors from safetensors one at a time: peak RSS ~= the model's bytes + at most 1.5 x its largest
tensor (tests/test_weights_memory.py: 1.08 x model bytes for a 361 MB checkpoint in the released
layout, 1.21 x when upcycling a 439 MB one; at 2B scale, 6.2 GB bf16 with a 0.38 GB embedding,
~1.1 x). A GGUF file is first dequantised by
transformers (fp32), whose tensors then become ours without a copy.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from evip.model.hf_config import detect_family, model_config_from_hf
from evip.model.hf_import import hf_key, load_gguf, read_hf_config
from evip.model.meta_load import build_empty, materialize
from evip.model.mono2b_layout import load_mono2b, save_mono2b
from evip.model.safetensors_io import SafetensorsCheckpoint
from evip.model.tokens import SPECIAL_TOKENS, add_image_tokens
from evip.model.upcycle import VocabExtension, init_vision_param, is_expert_copy, starts_fresh, text_source_of

__all__ = ["load_pretrained_llm", "load_mono2b", "save_mono2b"]


def _load_tokenizer(directory: Path, tokenizer: Any) -> Any:
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    where = Path(tokenizer) if tokenizer is not None else directory
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise FileNotFoundError(f"no usable tokenizer in {where} ({type(e).__name__}: {first}); "
                                "pass tokenizer=<a tokenizer or its directory>") from None


def load_pretrained_llm(source: str | Path, vision: Mapping[str, Any] | None = None, seed: int = 0,
                        dtype: torch.dtype | None = None, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """Upcycle a pretrained causal LM (HF directory or `.gguf` file) into a Mono-InternVL model.

    Text weights are the LLM's; visual FFNs (and visual attention experts when enabled) are
    copies of the text ones (`vision={"visual_ffn": "random"}`: fresh; "none": absent); the tokenizer gains the image / grounding tokens, whose embedding and
    head rows are the mean of the known rows; patch embedding and projector are initialised from
    `seed`. `vision` sets our non-LLM ModelConfig fields (tile size, patch size, D, experts...).
    `dtype` defaults to the checkpoint's (fp32 for GGUF). Returns (model, tokenizer) with
    `model.cfg.vocab_size` and `model.cfg.img_context_token_id` matching the tokenizer.
    """
    path = Path(source)
    if path.suffix == ".gguf":
        hf_cfg, tensors, tok = load_gguf(path)
        if tokenizer is not None:
            tok = _load_tokenizer(path.parent, tokenizer)
    else:
        if not path.is_dir():
            raise FileNotFoundError(f"pretrained LLM not found: {path} (an HF model directory or a .gguf file)")
        hf_cfg = read_hf_config(path)
        detect_family(hf_cfg, str(path / "config.json"))  # unsupported architecture: fail before any reading
        tensors = SafetensorsCheckpoint(path)
        tok = _load_tokenizer(path, tokenizer)
    where = f"{path}/config.json" if path.is_dir() else str(path)
    family = detect_family(hf_cfg, where)
    base = model_config_from_hf(hf_cfg, vision, where)

    known = len(tok)
    new_tokens = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    ids = add_image_tokens(tok)
    new_ids = tuple(tok.convert_tokens_to_ids(new_tokens))
    vocab = VocabExtension(base_rows=base.vocab_size, known=min(known, base.vocab_size), new_ids=new_ids)
    cfg = dataclasses.replace(base, vocab_size=vocab.rows, img_context_token_id=ids[2],
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else base.pad_token_id)

    if dtype is None:  # the checkpoint's own dtype, so the fresh vision parameters match it
        dtype = tensors.dtype_of(hf_key(family, "tok_embeddings.weight", cfg)[0])
    model = build_empty(cfg)

    packed: dict[str, torch.Tensor] = {}  # InternLM2: one wqkv read serves q, k and v

    def produce(name: str, shape: torch.Size) -> torch.Tensor:
        if starts_fresh(name, cfg.visual_ffn):
            return init_vision_param(name, shape, seed)
        key, pick = hf_key(family, text_source_of(name), cfg)
        if pick is not None:
            if key not in packed:
                packed.clear()
                packed[key] = tensors.get(key)
            t = pick(packed[key])
        else:
            t = tensors.get(key)
        if pick is None and is_expert_copy(name) and not tensors.fresh:
            t = t.clone()  # the expert trains apart from the text weights
        if name in ("tok_embeddings.weight", "output.weight"):
            t = vocab.extend(t)
        return t

    def where_of(name: str) -> str:
        return "initialisation" if starts_fresh(name, cfg.visual_ffn) else tensors.where(hf_key(family, text_source_of(name), cfg)[0])

    materialize(model, produce, dtype, where_of)
    return model, tok

