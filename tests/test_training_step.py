"""The trainer's step on a tiny pipeline: the head never runs on every position (no [B, T, vocab]
logits; the chunked labelled-only loss instead) and the logged step FLOPs are the packed count."""
from __future__ import annotations

import json

import torch

from evip.metrics import step_flops
from evip.model.loss import labelled_positions
from evip.model.mono import MonoInternVL
from evip.pipeline import load_pipeline, model_config, run_pipeline
from trainer_helpers import TINY, GeneratedBatches, generated_factory


def test_training_step_never_builds_full_logits_and_logs_packed_flops(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    head_calls = []
    head = MonoInternVL.head
    monkeypatch.setattr(MonoInternVL, "head", lambda self, h: head_calls.append(tuple(h.shape)) or head(self, h))
    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", "stages_all.steps=1", "stages_all.grad_accum=2"])
    run_pipeline(lp, tmp_path, loader_factory=generated_factory)
    assert head_calls == []                     # trainer: return_logits=False -> loss.head_lm_loss
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["kind"] == "train"]
    assert len(recs) == 4
    cfg = model_config(lp.cfg, "tiny")
    stage0 = lp.stages[0][0]
    # the first stage's two micro-batches, as generated_factory makes them
    batches = GeneratedBatches(cfg, lp.cfg.seed * 100 + len(stage0.name), 0)
    labelled = sum(labelled_positions(b["labels"], b["seq_ids"])[0].numel() for b in (batches.batch(0), batches.batch(1)))
    # each row: two samples of 16 tokens -> 2 * 16^2 attended pairs, 32 tokens
    assert recs[0]["step_flops"] == step_flops(cfg, 2 * 32, labelled, 2 * 2 * 16 ** 2)
