"""The four stages on a tiny model (one process, ZeRO-1 and ZeRO-3, bf16): what each stage may change.

S1.1 and S1.2 train only the patch embedding and the visual FFNs: every LLM parameter is bit-identical
to the base. S1.3 also trains attention: the text FFNs stay identical. S2 trains everything.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evip.model.groups import group_of
from evip.pipeline import load_pipeline, run_pipeline
from evip.stages import FrozenParameterChanged, verify_frozen
from trainer_helpers import TINY, generated_factory, train_losses

LLM = {"attention", "text_ffn", "norms", "embeddings", "head"}


@pytest.fixture(scope="module", params=[1, 3], ids=["zero1-bf16", "zero3-bf16"])
def run(tmp_path_factory, request):
    import os
    os.environ["WANDB_MODE"] = "disabled"
    d = tmp_path_factory.mktemp("pipeline")
    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", "stages_all.precision=bf16",
                              f"stages_all.zero_stage={request.param}"])
    run_pipeline(lp, d, loader_factory=generated_factory)
    (d / "zero_stage").write_text(str(request.param))
    return d


def _weights(run, name):
    path = run / "base" / "model.safetensors" if name == "base" else next((run / "stages").glob(f"*_{name}/model.safetensors"))
    return load_file(str(path))


def _changed(a, b):
    return {n: not torch.equal(a[n], b[n]) for n in a}


def _by_group(changed):
    out = {}
    for n, c in changed.items():
        if n == "vision.class_embedding":   # the class token is dropped after adding positions: no gradient
            assert not c
            continue
        out.setdefault(group_of(n), []).append(c)
    return out


def test_stage_weights_follow_trainable_groups(run):
    base, s11, s12, s13, s2 = (_weights(run, n) for n in
                               ("base", "s1_1_concept", "s1_2_semantic", "s1_3_alignment", "s2_instruct"))
    for before, after in ((base, s11), (s11, s12)):
        g = _by_group(_changed(before, after))
        assert not any(any(g[k]) for k in LLM)             # the whole LLM bit-identical
        assert all(g["patch_embed"]) and all(g["visual_ffn"])
    g = _by_group(_changed(s12, s13))
    assert not any(g["text_ffn"]) and not any(g["norms"]) and not any(g["embeddings"]) and not any(g["head"])
    assert all(g["attention"]) and all(g["visual_ffn"])
    g = _by_group(_changed(s13, s2))
    assert all(any(v) for v in g.values()) and sum(map(sum, g.values())) == len(s2) - 1
    assert all(t.dtype == torch.float32 for t in s2.values())


def test_rerun_of_a_finished_run_trains_nothing(run):
    before = (run / "metrics.jsonl").read_text()
    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", "stages_all.precision=bf16",
                              f"stages_all.zero_stage={(run / 'zero_stage').read_text()}"])
    assert run_pipeline(lp, run, loader_factory=generated_factory) == []
    assert (run / "metrics.jsonl").read_text() == before
    assert len(train_losses(run)) == 16


def test_frozen_check_names_the_parameter():
    with pytest.raises(FrozenParameterChanged, match="layers.0.attention.wo.weight"):
        verify_frozen({"norm.weight": "a", "layers.0.attention.wo.weight": "b"},
                      {"norm.weight": "a", "layers.0.attention.wo.weight": "c"}, "s1_1_concept")


def test_stages_all_in_the_file_comes_first_then_stage_overrides_then_the_command_line(tmp_path):
    stages = TINY.parent
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"""name: order
base: {{source: random}}
stages_all: [steps=3, tokens=0, grad_accum=2, "optim.lr=1e-3", data.recipe=r.yaml]
stages:
  - {{name: a, file: {stages}/s1_1_concept.yaml, overrides: [steps=5]}}
  - {{name: b, file: {stages}/s2_instruct.yaml}}
""")
    lp = load_pipeline(pipe, ["stages_all.grad_accum=4", "b.grad_accum=8"])
    (a, _), (b, _) = lp.stages
    assert (a.steps, a.grad_accum, a.optim.lr) == (5, 4, 1e-3)
    assert (b.steps, b.grad_accum, b.optim.lr) == (3, 8, 1e-3)


def test_finished_stages_can_drop_their_checkpoints(tmp_path, monkeypatch):
    """checkpoint.keep_after_stage=false: a finished stage keeps only its consolidated weights and
    DONE (the demo's 11 GB run dir becomes ~4 GB); the next stage and a rerun need nothing more."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = ["stages_all.data.recipe=unused.yaml", "stages_all.steps=2",
                 "stages_all.checkpoint.keep_after_stage=false", "s1_3_alignment.checkpoint.keep_after_stage=true"]
    lp = load_pipeline(TINY, overrides)
    lp.stages = lp.stages[:3]
    run_pipeline(lp, tmp_path, loader_factory=generated_factory)
    stages = sorted((tmp_path / "stages").iterdir())
    assert [d.name for d in stages] == ["0_s1_1_concept", "1_s1_2_semantic", "2_s1_3_alignment"]
    for d in stages:
        assert (d / "DONE").is_file() and (d / "model.safetensors").is_file()
    assert not (stages[0] / "ckpt").exists() and not (stages[1] / "ckpt").exists()
    assert (stages[2] / "ckpt" / "latest").is_file()                     # kept where asked
    before = (tmp_path / "metrics.jsonl").read_text()
    lp = load_pipeline(TINY, overrides)
    lp.stages = lp.stages[:3]
    assert run_pipeline(lp, tmp_path, loader_factory=generated_factory) == []
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_a_stage_without_its_end_checkpoint_reruns_to_the_same_weights(tmp_path, monkeypatch):
    """checkpoint.at_stage_end=false (the demo: no DeepSpeed save of the last step, ~10 s a stage on
    the real LLM): nothing in ckpt/; a kill before DONE (here: DONE and the weights removed, as a
    kill before they were written leaves the stage) reruns the stage from its start to the same
    bytes and the same losses."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = ["stages_all.data.recipe=unused.yaml", "stages_all.steps=3", "stages_all.checkpoint.at_stage_end=false"]

    def run():
        lp = load_pipeline(TINY, overrides)
        lp.stages = lp.stages[:1]
        run_pipeline(lp, tmp_path, loader_factory=generated_factory)
        return (stage / "model.safetensors").read_bytes(), [
            (r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"]

    stage = tmp_path / "stages" / "0_s1_1_concept"
    weights, losses = run()
    assert not list(stage.glob("ckpt/step_*")) and len(losses) == 3
    (stage / "DONE").unlink()
    (stage / "model.safetensors").unlink()
    again, both = run()
    assert again == weights and both == losses + losses
