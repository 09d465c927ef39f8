"""Shared fixtures: tiny configs and the real offline assets. Everything runs on CPU."""
from __future__ import annotations

import os

import pytest
import torch

from evip.model.config import ModelConfig

torch.set_num_threads(1)


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-layer model with 56 px tiles (4x4 patches -> 4 tokens per tile)."""
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
               max_position_embeddings=512, image_size=56, patch_size=14, vision_hidden_size=32,
               img_context_token_id=127, pad_token_id=0)
    cfg.update(overrides)
    return ModelConfig(**cfg)


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process runs set RANK/WORLD_SIZE/MASTER_PORT... for DeepSpeed (evip.distributed): restore the
    environment after each test, so later subprocesses are not taken for torchrun workers of a group
    whose port this process still holds."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(scope="session")
def smollm2_path():
    from evip.assets import smollm2_gguf
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The same LLM as an HF directory, converted once into ~/.cache/evip (`make setup` does it)."""
    from evip.assets import smollm2
    return smollm2()
