"""Interrupted + resumed runs give losses bit-identical to an uninterrupted run (one process).

The interruption is a real SIGUSR1 (the injected fault `faults.signal_after_step` makes rank 0
send it to itself after a step): the trainer checkpoints at the step boundary and raises Preempted; the rerun on
the same run dir resumes mid-stage, then crosses into the next stages.
"""
from __future__ import annotations

import pytest

from evip.pipeline import load_pipeline, run_pipeline
from evip.signals import Preempted
from trainer_helpers import TINY, generated_factory, train_losses

COMMON = ["stages_all.data.recipe=unused.yaml", "stages_all.checkpoint.every_steps=2", "stages_all.checkpoint.keep_last=1"]


def _run(run_dir, overrides, monkeypatch, signal_at=None):
    """`signal_at` "STAGE:STEP": that stage's rank 0 sends itself SIGUSR1 after that 0-based step."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    if signal_at:
        stage, step = signal_at.split(":")
        overrides = [*overrides, f"{stage}.faults.signal_after_step={step}"]
    run_pipeline(load_pipeline(TINY, COMMON + overrides), run_dir, loader_factory=generated_factory)


@pytest.mark.parametrize("zero", [2, 3])
def test_interrupted_runs_match_uninterrupted(tmp_path, monkeypatch, zero):
    ov = [f"stages_all.zero_stage={zero}", "stages_all.grad_accum=2"]
    _run(tmp_path / "straight", ov, monkeypatch)
    resumed = tmp_path / "resumed"
    with pytest.raises(Preempted):
        _run(resumed, ov, monkeypatch, signal_at="s1_1_concept:2")     # mid-stage, after a periodic ckpt
    with pytest.raises(Preempted):
        _run(resumed, ov, monkeypatch, signal_at="s1_3_alignment:0")   # resume crosses 2 stage boundaries
    _run(resumed, ov, monkeypatch)
    a, b = train_losses(tmp_path / "straight"), train_losses(resumed)
    assert len(a) == 16 and [x[:2] for x in a] == [x[:2] for x in b]
    assert a == b                                                      # bit-identical floats
    for i in range(4):
        sa = (tmp_path / "straight" / "stages").glob(f"{i}_*/model.safetensors")
        sb = (resumed / "stages").glob(f"{i}_*/model.safetensors")
        assert next(sa).read_bytes() == next(sb).read_bytes()
