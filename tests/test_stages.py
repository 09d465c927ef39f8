"""Stage configs, trainable sets, optimizer groups and the LR schedule (no engine)."""
from __future__ import annotations

import math

import pytest

from evip.config import ConfigError
from evip.engine import lr_lambda, param_groups
from evip.model.mono import MonoInternVL
from evip.stages import ScheduleConfig, apply_trainable, load_stage
from trainer_helpers import ROOT

PAPER = {"s1_1_concept": {"patch_embed", "visual_ffn"}, "s1_2_semantic": {"patch_embed", "visual_ffn"},
         "s1_3_alignment": {"patch_embed", "visual_ffn", "attention"},
         "s2_instruct": {"patch_embed", "visual_ffn", "attention", "text_ffn", "norms", "embeddings", "head"}}


@pytest.mark.parametrize("name", list(PAPER))
def test_stage_files_train_the_papers_groups(name, tiny_cfg):
    stage = load_stage(ROOT / "stages" / f"{name}.yaml", ["data.recipe=r.yaml"])
    model = MonoInternVL(tiny_cfg)
    trained = apply_trainable(model, stage, name)
    assert set(trained) == PAPER[name]
    for n, p in model.named_parameters():
        assert p.requires_grad == any(n in names for names in trained.values())
    assert stage.optim.betas == [0.9, 0.999] and stage.precision == "bf16"


def test_visual_attention_experts_are_a_group_when_enabled(tiny_cfg):
    from conftest import tiny_model_config
    stage = load_stage(ROOT / "stages" / "s1_1_concept.yaml",
                       ["data.recipe=r.yaml", "trainable=[patch_embed,visual_ffn,visual_attn]"])
    trained = apply_trainable(MonoInternVL(tiny_model_config(visual_attention_experts=True)), stage, "f.yaml")
    assert "visual_attn" in trained
    with pytest.raises(ConfigError, match=r"'trainable.2' in f.yaml: group 'visual_attn' matches no parameter"):
        apply_trainable(MonoInternVL(tiny_cfg), stage, "f.yaml")


def test_stage_file_errors_name_key_and_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: x\ntrainable: [patch_embed]\nsteps: 0\ndata: {recipe: r.yaml}\n")
    with pytest.raises(ConfigError, match=rf"'steps' in {f}"):
        load_stage(f)
    f.write_text("name: x\ntrainable: [patch_embed]\nsteps: 3\nzero_stage: 0\nprecision: bf16\ndata: {recipe: r.yaml}\n")
    with pytest.raises(ConfigError, match=rf"'zero_stage' in {f}: ZeRO-0 with bf16"):
        load_stage(f)
    f.write_text("name: x\ntrainable: [patch_embed]\nsteps: 3\n")
    with pytest.raises(ConfigError, match="'data.recipe' is missing"):
        load_stage(f)


def test_param_groups_decay_matrices_only(tiny_cfg):
    model = MonoInternVL(tiny_cfg)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert "tok_embeddings.weight" in no_decay and "norm.weight" in no_decay and "vision.position_embedding" in no_decay
    assert "layers.0.attention.o_proj.weight" in decay and "layers.1.feed_forward_ve.w1.weight" in decay
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(decay) + len(no_decay) == len(names)


def test_lr_schedule_warmup_cosine_and_constant():
    f = lr_lambda(ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5) and f(110) == pytest.approx(0.1)
    g = lr_lambda(ScheduleConfig(kind="constant", warmup_ratio=0.1), total_steps=50)
    assert g(0) == pytest.approx(0.2) and g(5) == 1.0 and g(49) == 1.0
    assert all(math.isfinite(f(s)) for s in range(200))
