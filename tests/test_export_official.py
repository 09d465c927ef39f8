"""The export loads in the released Mono-InternVL modelling code and gives our logits (text and
image tokens, a sequence past max_position_embeddings under dynamic NTK rope), and its tokenizer
loads under transformers 4.x, fast and slow, with our ids and chat template.

The released code needs transformers 4.x, so it runs in a child process (tests/official_check.py)
with EVIP_OFFICIAL_PYTHONPATH first on its path: a directory holding the `internvl` package of
github.com/OpenGVLab/Mono-InternVL, and one holding transformers 4.x (with its tokenizers and
huggingface_hub), peft and timm. Skipped when that variable is unset (CI has no copy of that code).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import prepared_tokenizer
from weights_helpers import hf_llm, save_hf

from evip.model.mono2b_layout import save_mono2b
from evip.model.serving import ServingConfig
from evip.model.vision import normalise_pixels
from evip.model.weights import load_pretrained_llm

OFFICIAL = os.environ.get("EVIP_OFFICIAL_PYTHONPATH")
pytestmark = pytest.mark.skipif(not OFFICIAL, reason="EVIP_OFFICIAL_PYTHONPATH (the released code + transformers 4.x) not set")


def test_official_code_loads_the_export_with_our_logits(tmp_path, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(prepared_tokenizer(tmp_path_factory.getbasetemp())))
    max_pos = 16
    llama = hf_llm("llama", vocab_size=len(tok), num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                   tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=max_pos,
                   rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    src = save_hf(llama, tmp_path / "llama", tokenizer=tok)
    model, tok = load_pretrained_llm(src, {"image_size": 56, "patch_size": 14, "vision_hidden_size": 32}, seed=0)
    cfg = model.cfg
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.tie_word_embeddings) == ("dynamic", 2.0, True)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision.", "mlp1.")) or ".feed_forward_ve." in name:
                p.copy_(0.3 * torch.randn_like(p))
    model.eval()
    n = cfg.tokens_per_tile
    text = tok("A red square on a white table, seen from above.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([text[:3] + [cfg.img_context_token_id] * (2 * n) + text[3:]])
    assert ids.shape[1] > max_pos
    pixels = normalise_pixels(torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8,
                                            generator=torch.Generator().manual_seed(0)), torch.float32)
    with torch.no_grad():
        logits = model(ids, pixel_values=pixels).logits
    out = save_mono2b(model, tmp_path / "export", tokenizer=tok,
                      serving=ServingConfig(max_dynamic_patch=12, system_prompt="Answer briefly."))
    prompt = AutoTokenizer.from_pretrained(str(out)).apply_chat_template(   # under transformers 5.x
        [{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?"
                      "<|im_end|>\n<|im_start|>assistant\n")
    sample = "Hello <IMG_CONTEXT> wörld <|im_end|>"
    torch.save({"input_ids": ids, "pixel_values": pixels, "logits": logits, "img_context_token_id": cfg.img_context_token_id,
                "text": sample, "text_ids": tok(sample, add_special_tokens=False)["input_ids"], "prompt": prompt},
               tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": OFFICIAL}
    child = subprocess.run([sys.executable, str(Path(__file__).parent / "official_check.py"), str(out),
                            str(tmp_path / "inputs.pt")], capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.strip().splitlines()[-1])
    print(json.dumps(got))
    assert got["transformers"].startswith("4.")
    assert (got["vision_model"], got["language_model"]) == ("InternVisionPatchModel", "InternLM2VEForCausalLM")
    assert got["rope"] == "InternLM2DynamicNTKScalingRotaryEmbedding"
    assert got["num_image_token"] == n and got["tiling"] == [True, 1, 12, True]
    assert got["max_abs_logit_diff"] < 1e-4 * max(1.0, got["logit_scale"]), got
    for fast in (True, False):
        assert got[f"tokenizer_fast={fast}"] == {"ids_equal": True, "template_equal": True,
                                                 "img_context_id": cfg.img_context_token_id}, got
