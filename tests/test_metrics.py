"""Metrics and evals on a real run (real loader, real SmolLM2 tokenizer, tiny model, one process):
JSONL records per step and per eval; the forgetting monitor is exactly 0 while the LLM is frozen
(S1.1) and moves once attention trains (S1.3); held-out caption loss; greedy captions."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from evip.metrics import active_params_per_token, peak_flops
from evip.pipeline import load_pipeline, run_pipeline
from trainer_helpers import prepared_tokenizer, write_e2e_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    import os
    os.environ["WANDB_MODE"] = "disabled"
    root = tmp_path_factory.mktemp("metrics")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(root / "red.png")
    tok = prepared_tokenizer(tmp_path_factory.getbasetemp())
    held = [f"eval.heldout_data.{k}" for k in ("token_budget=64", "num_workers=0", "sample.max_length=64",
                                               "sample.image.max_tiles=1", "sample.image.use_thumbnail=false")]
    pipe = write_e2e_pipeline(root, tok, stages=("s1_1_concept", "s1_3_alignment"), steps=2,
                              overrides=["eval.every_steps=1", f"eval.caption_images=[{root / 'red.png'}]",
                                         "eval.caption_max_new_tokens=4", *held])
    recipe = root / "captions.yaml"
    lp = load_pipeline(pipe, [f"stages_all.eval.heldout_data.recipe={recipe}"])
    run_pipeline(lp, root / "run")
    return [json.loads(l) for l in (root / "run" / "metrics.jsonl").read_text().splitlines()]


def test_train_records(records):
    train = [r for r in records if r["kind"] == "train"]
    assert [(r["stage"], r["step"]) for r in train] == [("s1_1_concept", 1), ("s1_1_concept", 2),
                                                        ("s1_3_alignment", 1), ("s1_3_alignment", 2)]
    for r in train:
        for k in ("loss", "loss_caption", "grad_norm", "lr", "tokens_per_s", "samples_per_s", "data_wait_frac"):
            assert math.isfinite(r[k]), k
        assert 0 <= r["data_wait_frac"] <= 1 and r["tokens_total"] > 0 and "mfu" not in r   # no MFU on CPU


def test_forgetting_monitor_and_evals(records):
    evals = [r for r in records if r["kind"] == "eval"]
    s11 = [r for r in evals if r["stage"] == "s1_1_concept"]
    s13 = [r for r in evals if r["stage"] == "s1_3_alignment"]
    assert len(s11) == 2 and len(s13) == 2 and s11[-1]["final"] and s13[-1]["final"]
    assert all(r["text_loss_change_vs_base"] == 0.0 for r in s11)           # LLM frozen: bit-identical
    assert s13[-1]["text_loss_change_vs_base"] != 0.0                        # attention trained
    assert s13[0]["text_loss_change_vs_stage_start"] != 0.0
    assert all(math.isfinite(r["heldout_caption_loss"]) for r in evals)
    for r in evals:                    # the same captions under other pictures: a different loss
        assert math.isfinite(r["heldout_caption_loss_other_image"])
        assert r["image_gain"] == r["heldout_caption_loss_other_image"] - r["heldout_caption_loss"] != 0.0
    assert s11[0]["heldout_caption_loss"] != s11[1]["heldout_caption_loss"]  # the visual side learns
    assert all(len(r["captions"]) == 1 and isinstance(r["captions"][0], str) for r in evals)


def test_peak_flops_and_routed_flops(tiny_cfg):
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None
    from dataclasses import replace
    # a token runs ONE FFN: the visual experts add parameters, not FLOPs
    assert active_params_per_token(tiny_cfg) == active_params_per_token(replace(tiny_cfg, visual_attention_experts=True))
    h, f, L = tiny_cfg.hidden_size, tiny_cfg.intermediate_size, tiny_cfg.num_layers
    assert active_params_per_token(tiny_cfg) > L * 3 * h * f and active_params_per_token(tiny_cfg) < L * 6 * h * f + h * tiny_cfg.vocab_size * 2


def test_wandb_offline_run_in_run_dir(tmp_path, monkeypatch, tiny_cfg):
    from evip.metrics import Metrics
    from evip.pipeline import WandbConfig
    monkeypatch.setenv("WANDB_MODE", "offline")
    m = Metrics(tmp_path, 0, tiny_cfg, WandbConfig(), "test")
    assert m.wandb is not None
    m.log_eval("s1_1_concept", 1, {"text_loss": 1.5})
    m.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["text_loss"] == 1.5
