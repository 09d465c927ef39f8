"""Tiny pretrained-LLM checkpoints for the weights tests: real transformers models, random weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6, max_position_embeddings=256)


def tiny_tokenizer(vocab_size: int = 128):
    """A real fast tokenizer (word level) whose vocabulary fills `vocab_size` ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>"] + [f"w{i}" for i in range(vocab_size - 2)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) logits: HF's 0.02-std init makes every logit ~0 and parity checks meaningless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def hf_llm(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random `LlamaForCausalLM` / `Qwen2ForCausalLM` (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **overrides}))
    return randomize(model, seed).eval()


def save_hf(model, directory: Path, tokenizer=None, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), **kwargs)
    (tokenizer or tiny_tokenizer(model.config.vocab_size)).save_pretrained(str(directory))
    return directory


def internlm2_wqkv(q, k, v, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Pack q/k/v as InternLM2 does, written from its forward: rows (kv_heads, q_per_kv + 2, head_dim)."""
    g = q.shape[0] // (kv_heads * head_dim)
    rows = []
    for h in range(kv_heads):
        for j in range(g):
            head = h * g + j
            rows.append(q[head * head_dim:(head + 1) * head_dim])
        rows.append(k[h * head_dim:(h + 1) * head_dim])
        rows.append(v[h * head_dim:(h + 1) * head_dim])
    return torch.cat(rows, 0)


def save_as_internlm2(llama, directory: Path) -> Path:
    """Rewrite a Llama checkpoint in InternLM2's key layout (packed wqkv) + its config.json."""
    from safetensors.torch import save_file

    c = llama.config
    sd = llama.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, o = f"model.layers.{i}.", f"model.layers.{i}."
        q, k, v = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        out[o + "attention.wqkv.weight"] = internlm2_wqkv(q, k, v, c.num_key_value_heads, c.head_dim)
        out[o + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[o + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[o + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[o + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[o + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[o + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(directory / "model.safetensors"))
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
              "hidden_act": "silu", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "rms_norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_parameters["rope_theta"], "max_position_embeddings": c.max_position_embeddings,
              "vocab_size": c.vocab_size, "tie_word_embeddings": False,
              "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    (directory / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(c.vocab_size).save_pretrained(str(directory))
    return directory
