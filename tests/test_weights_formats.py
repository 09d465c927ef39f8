"""Checkpoint formats without a model: wqkv packing, streamed safetensors, HF configs, vocab growth."""
from __future__ import annotations

import json

import pytest
import torch
from weights_helpers import internlm2_wqkv

from evip.model.hf_config import UnsupportedArchitectureError, model_config_from_hf
from evip.model.safetensors_io import CheckpointError, MissingTensorError, SafetensorsCheckpoint, write_safetensors
from evip.model.upcycle import VocabExtension, init_vision_param
from evip.model.wqkv import pack_wqkv, unpack_wqkv


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4), (6, 1)])
def test_unpacked_wqkv_projects_like_internlm2_forward(heads, kv):
    """InternLM2's forward: qkv = wqkv(x); view (kv, q_per_kv + 2, d); q = [:, :g], k = [:, -2], v = [:, -1]."""
    d, hidden, g = 8, 24, heads // kv
    wqkv = torch.randn(kv * (g + 2) * d, hidden)
    x = torch.randn(5, hidden)
    qkv = (x @ wqkv.T).view(5, kv, g + 2, d)
    q_ref = qkv[:, :, :g].reshape(5, heads, d)
    k_ref, v_ref = qkv[:, :, -2], qkv[:, :, -1]
    q, k, v = unpack_wqkv(wqkv, heads, kv, d)
    close = dict(atol=1e-5, rtol=0)   # different matmul shapes sum in a different order
    torch.testing.assert_close((x @ q.T).view(5, heads, d), q_ref, **close)
    torch.testing.assert_close((x @ k.T).view(5, kv, d), k_ref, **close)
    torch.testing.assert_close((x @ v.T).view(5, kv, d), v_ref, **close)
    assert torch.equal(pack_wqkv(q, k, v, heads, kv, d), wqkv)
    assert torch.equal(internlm2_wqkv(q, k, v, kv, d), wqkv)   # the helper the checkpoint tests use agrees


def test_wqkv_bias_round_trip_and_bad_rows():
    q, k, v = torch.randn(32), torch.randn(16), torch.randn(16)
    packed = pack_wqkv(q, k, v, 4, 2, 8)
    assert all(torch.equal(a, b) for a, b in zip(unpack_wqkv(packed, 4, 2, 8), (q, k, v)))
    with pytest.raises(ValueError, match="wqkv has 64 rows, expected 96"):
        unpack_wqkv(packed, 8, 2, 8)


def test_sharded_safetensors_stream_back_every_tensor(tmp_path):
    tensors = {f"t{i}": torch.randn(100, 10 + i) for i in range(6)}
    paths = write_safetensors(tensors, tmp_path, max_shard_bytes=4000)  # one tensor per shard
    assert len(paths) == 6 and (tmp_path / "model.safetensors.index.json").is_file()
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert sorted(ckpt.keys()) == sorted(tensors)
    for k, t in tensors.items():
        assert torch.equal(ckpt.get(k), t)
    with pytest.raises(MissingTensorError, match=r"'nope' is missing from the checkpoint .*index\.json"):
        ckpt.get("nope")
    single = tmp_path / "one"
    write_safetensors(tensors, single)
    assert [p.name for p in single.iterdir()] == ["model.safetensors"]


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no safetensors weights in"):
        SafetensorsCheckpoint(tmp_path)
    write_safetensors({"a": torch.ones(300), "b": torch.ones(300)}, tmp_path, max_shard_bytes=1000)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard .*model-00002-of-00002.safetensors listed in .* is missing"):
        SafetensorsCheckpoint(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["b"] = "model-00001-of-00002.safetensors"      # index lies about where 'b' is
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingTensorError, match="'b' is listed in .* but missing from .*00001"):
        SafetensorsCheckpoint(tmp_path).get("b")


def test_configs_of_the_three_families():
    from transformers import LlamaConfig, Qwen2Config

    llama = model_config_from_hf(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=32, rope_theta=500.0, tie_word_embeddings=True,
                                             num_hidden_layers=3, intermediate_size=96, vocab_size=100),
                                 {"image_size": 56, "vision_hidden_size": 32})
    assert (llama.head_dim, llama.rope_theta, llama.tie_word_embeddings, llama.attention_bias) == (32, 500.0, True, False)
    assert (llama.num_layers, llama.num_kv_heads, llama.image_size, llama.vision_hidden_size) == (3, 2, 56, 32)
    qwen = model_config_from_hf(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                            rms_norm_eps=1e-5, rope_theta=1e6))
    assert qwen.attention_bias and (qwen.head_dim, qwen.num_kv_heads, qwen.rms_norm_eps, qwen.rope_theta) == (16, 1, 1e-5, 1e6)
    internlm2 = model_config_from_hf({"architectures": ["InternLM2ForCausalLM"], "hidden_size": 2048,
                                      "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 8192,
                                      "num_hidden_layers": 24, "vocab_size": 92544, "rope_theta": 1e6,
                                      "rms_norm_eps": 1e-5, "bias": False})
    assert (internlm2.head_dim, internlm2.rope_theta, internlm2.attention_bias) == (128, 1e6, False)


def test_config_errors_name_the_cause():
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type='gpt2'.*supported: llama .*qwen2.*internlm2"):
        model_config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, source="x/config.json")
    with pytest.raises(UnsupportedArchitectureError, match="RoPE scaling 'llama3'"):
        model_config_from_hf({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                              "rope_scaling": {"rope_type": "llama3"}})
    with pytest.raises(ValueError, match=r"\['hidden_size'\] are not allowed"):
        model_config_from_hf({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
                              "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 8}, {"hidden_size": 4})


def test_vocab_extension_appends_mean_rows():
    table = torch.randn(10, 4)
    ext = VocabExtension(base_rows=10, known=8, new_ids=(10, 11, 12))
    out = ext.extend(table)
    assert out.shape == (13, 4) and torch.equal(out[:10], table)
    assert torch.allclose(out[10:], table[:8].mean(0).expand(3, 4), atol=1e-6)
    # ids inside a padded table (Qwen2-style): those rows are overwritten, the rest kept
    inside = VocabExtension(base_rows=10, known=6, new_ids=(6, 7)).extend(table)
    assert inside.shape == (10, 4) and torch.equal(inside[8:], table[8:])
    assert torch.allclose(inside[6], table[:6].mean(0), atol=1e-6)


def test_vision_init_is_deterministic_per_name():
    a = init_vision_param("mlp1.1.weight", torch.Size([8, 16]), seed=3)
    assert torch.equal(a, init_vision_param("mlp1.1.weight", torch.Size([8, 16]), seed=3))
    assert not torch.equal(a, init_vision_param("mlp1.1.weight", torch.Size([8, 16]), seed=4))
    assert not torch.equal(a, init_vision_param("mlp1.3.weight", torch.Size([8, 16]), seed=3))
    assert torch.equal(init_vision_param("mlp1.0.weight", torch.Size([4]), 0), torch.ones(4))
    assert torch.equal(init_vision_param("mlp1.1.bias", torch.Size([8]), 0), torch.zeros(8))
    big = init_vision_param("vision.position_embedding", torch.Size([1, 17, 512]), 0)
    assert abs(big.std().item() - 0.02) < 0.002
