"""The stage loop: non-finite steps are skipped and counted; K in a row -> checkpoint and stop."""
from __future__ import annotations

import json

import pytest
import torch

from evip.pipeline import load_pipeline, run_pipeline
from evip.signals import TooManyNonFinite
from trainer_helpers import TINY, generated_factory


@pytest.mark.parametrize("zero", [0, 2])
def test_nonfinite_steps_skipped_then_stop(tmp_path, monkeypatch, zero):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    engines = []
    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", f"stages_all.zero_stage={zero}",
                              "s1_1_concept.steps=8", "s1_1_concept.max_nonfinite=2",
                              "s1_1_concept.faults.nonfinite_steps=[1,3,4]"])   # 0-based steps whose loss is NaN
    with pytest.raises(TooManyNonFinite, match="2 non-finite steps in a row"):
        run_pipeline(lp, tmp_path, loader_factory=generated_factory, on_engine=engines.append)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [False, True, False, True, True]
    assert recs[-1]["skipped_total"] == 3
    assert all(torch.isfinite(p).all() for p in engines[0].module.parameters())     # no NaN update applied
    ckpt = tmp_path / "stages" / "0_s1_1_concept" / "ckpt"
    meta = json.loads((ckpt / "step_00000005" / "meta.json").read_text())
    assert meta["counters"]["nonfinite"] == 2 and (ckpt / "latest").read_text().strip() == "step_00000005"


def test_skipped_step_leaves_weights_unchanged(tmp_path, monkeypatch):
    """Step 1 is NaN: the weights after 2 steps equal the weights after 1 step."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = {}
    for name, steps, nan in (("one", 1, "[]"), ("two", 2, "[1]")):
        engines = []
        lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", f"s1_1_concept.steps={steps}",
                                  "s1_1_concept.schedule.kind=constant", f"s1_1_concept.faults.nonfinite_steps={nan}"])
        lp.stages = lp.stages[:1]
        run_pipeline(lp, tmp_path / name, loader_factory=generated_factory, on_engine=engines.append)
        out[name] = {n: p.detach().clone() for n, p in engines[0].module.named_parameters()}
    assert all(torch.equal(out["one"][n], out["two"][n]) for n in out["one"])


def test_stage_length_in_tokens_and_timed_checkpoints(tmp_path, monkeypatch):
    """tokens=100 with 32-token micro-batches: 4 steps; every_minutes tiny: a checkpoint after every step."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", "s1_1_concept.steps=0", "s1_1_concept.tokens=100",
                              "s1_1_concept.checkpoint.every_minutes=1e-6", "s1_1_concept.checkpoint.keep_last=10"])
    lp.stages = lp.stages[:1]
    (counters,) = run_pipeline(lp, tmp_path, loader_factory=generated_factory)
    assert counters.step == 4 and counters.tokens == 128
    ckpt = tmp_path / "stages" / "0_s1_1_concept" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 3, 4)]


def test_zero0_clips_and_reports_grad_norm_like_zero2(tmp_path, monkeypatch):
    """Under ZeRO-0 fp32 our GuardedAdamW clips and reports the global grad norm (DeepSpeed's ZeRO-0
    reports none). With a clip that binds, the reported pre-clip norms of both steps and the
    weights at the stage end must equal ZeRO-2's (same weights, same batches): the second step's
    norm depends on the first, clipped update."""
    from safetensors.torch import load_file
    monkeypatch.setenv("WANDB_MODE", "disabled")
    norms, weights = {}, {}
    for zero in (0, 2):
        lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", f"stages_all.zero_stage={zero}",
                                  "s1_1_concept.steps=2", "stages_all.clip_grad=0.05"])
        lp.stages = lp.stages[:1]
        run_pipeline(lp, tmp_path / f"z{zero}", loader_factory=generated_factory)
        recs = [json.loads(l) for l in (tmp_path / f"z{zero}" / "metrics.jsonl").read_text().splitlines()]
        norms[zero] = [r["grad_norm"] for r in recs if r.get("kind") == "train"]
        weights[zero] = load_file(tmp_path / f"z{zero}" / "stages" / "0_s1_1_concept" / "model.safetensors")
    assert len(norms[0]) == 2 and min(norms[0]) > 0.05            # the clip binds on both steps
    assert norms[0] == pytest.approx(norms[2], rel=1e-5)
    assert weights[0].keys() == weights[2].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[2][name], rtol=1e-5, atol=1e-6, msg=name)
