"""Guards that guard: each test here fails when the guard it names is broken (tried once each).

- `frozen_digest` must hash every frozen parameter (break: `if p.requires_grad:` -> `if True:`);
- `verify_frozen` must treat a missing digest as a change (break: `after.get(n, before[n])`);
- a stage run whose frozen parameter changes must raise FrozenParameterChanged;
- resume restores every RNG (break: drop `set_rng_state` in `restore_rank_state`);
- `latest` is published only once the checkpoint it names is complete and verifies (break: write
  `latest` before the rename of `.tmp-step_N`).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from evip import checkpoint as ckpt
from evip.model.mono import MonoInternVL
from evip.pipeline import load_pipeline, run_pipeline
from evip.stages import FrozenParameterChanged, apply_trainable, frozen_digest, load_stage, verify_frozen
from trainer_helpers import ROOT, TINY, GeneratedBatches, generated_factory


def test_frozen_digest_hashes_every_frozen_parameter_and_sees_a_change(tiny_cfg):
    model = MonoInternVL(tiny_cfg)
    apply_trainable(model, load_stage(ROOT / "stages" / "s1_1_concept.yaml", ["data.recipe=r.yaml"]), "s1_1")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and len(frozen) < len(list(model.parameters()))
    before = frozen_digest(model)
    assert sorted(before) == sorted(frozen)
    with torch.no_grad():
        dict(model.named_parameters())[frozen[0]].view(-1)[0] += 1e-3
    after = frozen_digest(model)
    assert [n for n in before if before[n] != after[n]] == [frozen[0]]


def test_verify_frozen_counts_a_missing_digest_as_changed():
    with pytest.raises(FrozenParameterChanged, match="'norm.weight'"):
        verify_frozen({"norm.weight": "a", "tok_embeddings.weight": "b"}, {"tok_embeddings.weight": "b"}, "s")
    verify_frozen({"norm.weight": "a"}, {"norm.weight": "a"}, "s")      # unchanged: silent


def test_a_stage_whose_frozen_parameter_changes_raises(tmp_path, monkeypatch):
    """The engine is handed to the test after the stage recorded its frozen digests; the test then
    changes one frozen LLM weight, as a freezing bug would. The stage end must refuse to hand on."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", "s1_1_concept.steps=2"])
    lp.stages = lp.stages[:1]

    def tamper(engine):
        p = dict(engine.module.named_parameters())["layers.0.attention.o_proj.weight"]
        assert not p.requires_grad
        with torch.no_grad():
            p.view(-1)[0] += 1.0

    with pytest.raises(FrozenParameterChanged, match="layers.0.attention.o_proj.weight"):
        run_pipeline(lp, tmp_path, loader_factory=generated_factory, on_engine=tamper)
    assert not (tmp_path / "stages" / "0_s1_1_concept" / "DONE").exists()


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist()


def test_rng_draws_after_save_load_equal_the_draws_after_save(tmp_path, tiny_cfg):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    loader = GeneratedBatches(tiny_cfg, seed=0, rank=0)
    next(iter(loader))
    ckpt.save_rank_state(tmp_path, 0, loader)
    expected = _draws()
    _draws()                                     # move every generator on
    loader.index = 99
    ckpt.restore_rank_state(tmp_path, loader, rank=0, world_size=1, saved_ws=1)
    assert _draws() == expected and loader.index == 1
    assert not list(tmp_path.glob("*.pt"))       # JSON + safetensors, no pickle


def test_latest_is_published_only_after_the_checkpoint_it_names_is_complete(tmp_path, monkeypatch):
    """Every replacement of `latest` during a real run is intercepted: at that instant the
    checkpoint it is about to name must exist and pass full verification (manifest)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    real_replace, seen = os.replace, []

    def replace(src, dst):
        if Path(dst).name == ckpt.LATEST:
            name = Path(src).read_text().strip()
            target = Path(dst).parent / name
            seen.append((name, ckpt.verify(target) if target.is_dir() else ["not there"]))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", "s1_1_concept.steps=4",
                              "s1_1_concept.checkpoint.every_steps=2"])
    lp.stages = lp.stages[:1]
    run_pipeline(lp, tmp_path, loader_factory=generated_factory)
    assert [n for n, _ in seen] == ["step_00000002", "step_00000004"]
    assert all(problems == [] for _, problems in seen), seen
