"""DeepSpeed engine settings: gradients reduced and accumulated in fp32 under bf16, and ZeRO-3
with parameters that are really partitioned (the persistence threshold lowered: every tiny-model
parameter is below DeepSpeed's default 1e5 elements), still resuming bit-identically."""
from __future__ import annotations

import pytest
import torch

from evip import engine as engine_mod
from evip.pipeline import load_pipeline, run_pipeline
from evip.signals import Preempted
from evip.stages import StageConfig
from trainer_helpers import TINY, generated_factory, train_losses


class _Built(Exception):
    pass


def test_bf16_reduces_and_accumulates_gradients_in_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = engine_mod.deepspeed_config(StageConfig(name="x", zero_stage=1, precision="bf16"))
    assert cfg["communication_data_type"] == "fp32" and cfg["data_types"]["grad_accum_dtype"] == "fp32"
    engines = []

    def stop(e):          # the first stage's engine is all this test needs (test_pipeline trains bf16)
        engines.append(e)
        raise _Built

    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", "stages_all.zero_stage=1",
                              "stages_all.precision=bf16", "stages_all.grad_accum=2"])
    with pytest.raises(_Built):
        run_pipeline(lp, tmp_path, loader_factory=generated_factory, on_engine=stop)
    e = engines[0]
    assert e.communication_data_type == torch.float32 and e.get_data_types() == (torch.bfloat16, torch.float32)
    assert type(e.optimizer).__name__ == "BF16_Optimizer"        # fp32 gradient accumulation under ZeRO-1


def test_zero3_partitions_parameters_and_resumes_bit_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(engine_mod, "ZERO3_PERSISTENCE_THRESHOLD", 0)
    common = ["stages_all.data.recipe=unused.yaml", "stages_all.zero_stage=3", "stages_all.grad_accum=2",
              "stages_all.checkpoint.every_steps=2", "stages_all.checkpoint.keep_last=1", "stages_all.steps=3"]
    partitioned = []

    def check(e):   # between steps a ZeRO-3 parameter holds no data: it is gathered for each forward
        partitioned.append(all(not p.ds_persist and p.data.numel() == 0 for p in e.module.parameters()))

    run_pipeline(load_pipeline(TINY, common), tmp_path / "straight", loader_factory=generated_factory,
                 on_engine=check)
    resumed = tmp_path / "resumed"
    with pytest.raises(Preempted):
        run_pipeline(load_pipeline(TINY, common + ["s1_2_semantic.faults.signal_after_step=1"]), resumed,
                     loader_factory=generated_factory, on_engine=check)
    run_pipeline(load_pipeline(TINY, common), resumed, loader_factory=generated_factory, on_engine=check)
    assert partitioned and all(partitioned)
    a, b = train_losses(tmp_path / "straight"), train_losses(resumed)
    assert len(a) == 12 and a == b                                  # bit-identical floats
