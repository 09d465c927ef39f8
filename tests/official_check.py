"""Child process of tests/test_export_official.py: load an evip export with the released
Mono-InternVL modelling code (run under that code's transformers 4.x, from PYTHONPATH) and compare.

    python official_check.py EXPORT_DIR INPUTS.pt   ->  one JSON line

INPUTS.pt holds input_ids [1, T], normalised pixel_values [N, 3, S, S], evip's logits [1, T, V],
a text and its evip token ids, and the chat prompt evip's template renders.
"""
from __future__ import annotations

import json
import sys

import torch


def main(export_dir: str, inputs_path: str) -> None:
    import transformers
    from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel
    from transformers import AutoTokenizer

    inputs = torch.load(inputs_path)
    config = InternVLChatConfig.from_pretrained(export_dir)
    model = InternVLChatModel.from_pretrained(export_dir, torch_dtype=torch.float32).eval()
    result = {"transformers": transformers.__version__,
              "vision_model": type(model.vision_model).__name__,
              "language_model": type(model.language_model).__name__,
              "rope": type(model.language_model.model.layers[0].attention.rotary_emb).__name__,
              "num_image_token": model.num_image_token,
              "tiling": [config.dynamic_image_size, config.min_dynamic_patch, config.max_dynamic_patch,
                         config.use_thumbnail]}
    model.img_context_token_id = int(inputs["img_context_token_id"])
    pixel_values = inputs["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=inputs["input_ids"],
                    image_flags=torch.ones(pixel_values.shape[0], 1, dtype=torch.long))
    result["max_abs_logit_diff"] = float((out.logits - inputs["logits"]).abs().max())
    result["logit_scale"] = float(inputs["logits"].abs().max())
    for fast in (True, False):   # LMDeploy's VL path loads it with use_fast=False
        tok = AutoTokenizer.from_pretrained(export_dir, use_fast=fast)
        ids = tok(inputs["text"], add_special_tokens=False)["input_ids"]
        prompt = tok.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False,
                                         add_generation_prompt=True)
        result[f"tokenizer_fast={fast}"] = {"ids_equal": ids == inputs["text_ids"],
                                            "template_equal": prompt == inputs["prompt"],
                                            "img_context_id": tok.convert_tokens_to_ids("<IMG_CONTEXT>")}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
