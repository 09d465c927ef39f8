"""Bad checkpoints fail early with a message naming the cause (architecture, tensor + file, path, shape)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model_config
from safetensors.torch import load_file, save_file
from weights_helpers import hf_llm, save_hf

from evip.model.hf_config import UnsupportedArchitectureError
from evip.model.mono import MonoInternVL
from evip.model.mono2b_layout import load_mono2b, save_mono2b
from evip.model.safetensors_io import MissingTensorError, ShapeMismatchError
from evip.model.weights import load_pretrained_llm

VISION = {"image_size": 56, "vision_hidden_size": 32}


@pytest.fixture
def llama_dir(tmp_path):
    return save_hf(hf_llm("llama"), tmp_path / "llama")


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unknown_architecture_names_supported_ones(llama_dir):
    edit_config(llama_dir, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_pretrained_llm(llama_dir, VISION)
    msg = str(e.value)
    assert "GPTNeoXForCausalLM" in msg and "config.json" in msg
    assert all(name in msg for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "InternLM2ForCausalLM"))


def test_missing_tensor_names_key_and_file(llama_dir):
    path = llama_dir / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(MissingTensorError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing .*model\.safetensors"):
        load_pretrained_llm(llama_dir, VISION)


def test_missing_gguf_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "SmolLM2.gguf"
    with pytest.raises(FileNotFoundError, match=f"GGUF file not found: {missing}"):
        load_pretrained_llm(missing, VISION)


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained LLM not found: .*nope"):
        load_pretrained_llm(tmp_path / "nope", VISION)


def test_shape_mismatch_names_key_expected_and_got(llama_dir):
    edit_config(llama_dir, intermediate_size=80)          # config no longer matches the weights (96)
    with pytest.raises(ShapeMismatchError) as e:
        load_pretrained_llm(llama_dir, VISION)
    msg = str(e.value)
    assert "layers.0.feed_forward.w1.weight" in msg and "(80, 64)" in msg and "(96, 64)" in msg
    assert "model.safetensors" in msg


def test_mono2b_missing_tensor_names_released_key_and_shard(tmp_path):
    torch.manual_seed(0)
    save_mono2b(MonoInternVL(tiny_model_config()), tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = "language_model.model.layers.1.feed_forward_ve.w3.weight"
    shard = tmp_path / index["weight_map"][key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard))
    with pytest.raises(MissingTensorError, match=f"'{key}' is listed in .*index.json but missing from .*{shard.name}"):
        load_mono2b(tmp_path)


def test_mono2b_not_a_mono_config(tmp_path, llama_dir):
    with pytest.raises(ValueError, match="has no 'llm_config'"):
        load_mono2b(llama_dir)


def test_directory_without_tokenizer_says_how_to_pass_one(tmp_path):
    hf_llm("llama").save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no usable tokenizer in .*pass tokenizer="):
        load_pretrained_llm(tmp_path, VISION)
