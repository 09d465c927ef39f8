"""The special tokens a Mono-InternVL tokenizer carries, and how to add them."""
from __future__ import annotations

import inspect

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
GROUNDING_TOKENS = ["<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SPECIAL_TOKENS = [IMG_START, IMG_END, IMG_CONTEXT, *GROUNDING_TOKENS]

# Chat markers of the internlm2-chat template; SmolLM2-Instruct uses the same strings.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


def add_image_tokens(tokenizer) -> list[int]:
    """Add the image and grounding tokens as special tokens (idempotent); return their ids.

    Returns the ids of SPECIAL_TOKENS in order; `ids[2]` is the <IMG_CONTEXT> id.
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        # special: never split by the BPE, skipped by decode(skip_special_tokens=True). The keyword that
        # keeps earlier extra special tokens was renamed in transformers 5.
        keep = ("replace_extra_special_tokens"
                if "replace_extra_special_tokens" in inspect.signature(tokenizer.add_special_tokens).parameters
                else "replace_additional_special_tokens")
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, **{keep: False})
    return tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)


def load_tokenizer(source):
    """Load a tokenizer from an HF directory or a `.gguf` file and add the image tokens.

    Raises FileNotFoundError naming the path when it does not exist.
    """
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer source not found: {path} (an HF model directory or a .gguf file)")
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    add_image_tokens(tok)
    return tok
