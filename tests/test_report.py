"""`evip report`: plots and summary from a metrics.jsonl written by the trainer's own Metrics writer."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from evip.checkpoint import Counters
from evip.config import to_yaml
from evip.metrics import Metrics
from evip.model.groups import named_groups
from evip.model.mono import MonoInternVL
from evip.report import read_metrics, write_report
from evip.stages import StageConfig
from tests.conftest import tiny_model_config

STAGES = [("s1_1_concept", ["patch_embed", "visual_ffn"], "caption"),
          ("s1_2_semantic", ["patch_embed", "visual_ffn"], "caption"),
          ("s1_3_alignment", ["patch_embed", "visual_ffn", "attention"], "caption"),
          ("s2_instruct", ["all"], "chat")]
BASE_TEXT_LOSS = 3.25


def fake_run(run_dir, steps=6, resumed_stage=None):
    """A run dir as `evip run` leaves it, metrics written by evip.metrics.Metrics itself."""
    cfg = tiny_model_config()
    (run_dir / "base").mkdir(parents=True)
    (run_dir / "base" / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    metrics = Metrics(run_dir, 0, cfg, None)
    for i, (name, groups, kind) in enumerate(STAGES):
        sdir = run_dir / "stages" / f"{i}_{name}"
        sdir.mkdir(parents=True)
        (sdir / "stage.yaml").write_text(to_yaml(StageConfig(name=name, trainable=groups, steps=steps)))
        text_loss = BASE_TEXT_LOSS + 0.1 * max(0, i - 1)   # frozen LLM in S1.1/S1.2: unchanged
        # what evip.evals.Evaluator.stage_start leaves
        (sdir / "eval_start.json").write_text(json.dumps({"text_loss": text_loss}))
        if i == 0:
            (run_dir / "eval_base.json").write_text(json.dumps({"text_loss": text_loss}))
        c = Counters()
        replay = [3, 4] if name == resumed_stage else []    # a resume repeats steps 3-4
        for step in list(range(1, steps + 1)) + replay:
            c.step, c.tokens, c.samples = step, step * 512, step * 8
            loss = 4.0 - i * 0.5 - 0.1 * step
            stats = {"loss": loss, "grad_norm": 1.0, "tokens": 512, "samples": 8,
                     "kind_loss": {"caption": loss if kind == "caption" else None,
                                   "chat": loss if kind == "chat" else None, "text": None}}
            metrics.log_step(name, c, stats, 1e-4, 0.5, 0.05 * (i + 1) * 0.5, steps, False)
        metrics.log_eval(name, steps, {"final": True, "text_loss": BASE_TEXT_LOSS + 0.1 * i if i > 1 else text_loss,
                                       "heldout_caption_loss": 4.0 - i * 0.5 - 0.6,
                                       "heldout_caption_loss_other_image": 4.0 - i * 0.25 - 0.6})
    metrics.close()
    return cfg


def test_read_metrics_keeps_last_record_per_step(tmp_path):
    fake_run(tmp_path, resumed_stage="s1_2_semantic")
    stages = read_metrics(tmp_path / "metrics.jsonl")
    assert [s.name for s in stages] == [n for n, _, _ in STAGES]
    assert all(s.steps == 6 and len(s.train) == 6 and len(s.evals) == 1 for s in stages)
    assert stages[1].tokens == 6 * 512
    assert stages[0].seconds == pytest.approx(6 * 0.5)


def test_report_writes_plots_and_summary(tmp_path, capsys):
    cfg = fake_run(tmp_path)
    from evip.cli import main
    assert main(["report", str(tmp_path)]) == 0
    out = tmp_path / "report"
    for name in ("loss", "forgetting", "throughput", "data_wait"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| s1", "| s2"))]
    assert len(rows) == 4
    sizes = {g: sum(p.numel() for _, p in ps) for g, ps in named_groups(MonoInternVL(cfg)).items()}
    cells = [r.strip("|").split("|") for r in rows]
    assert cells[0][1].strip().startswith(f"{sizes['patch_embed'] + sizes['visual_ffn']:,} (")
    assert cells[3][1].strip() == f"{sum(sizes.values()):,} (100%)"
    assert cells[0][2].strip() == "6" and cells[0][3].strip() == "3,072"
    ppl = f"{math.exp(BASE_TEXT_LOSS):.4f}"
    assert cells[0][6].strip() == f"{ppl} -> {ppl} (identical)"
    assert cells[1][6].strip() == f"{ppl} -> {ppl} (identical)"
    assert "identical" not in cells[3][6]
    assert cells[0][5].strip() == "3.400 / 3.400" and cells[3][5].strip() == "1.900 / 2.650"   # own / other image
    # one held-out eval per stage: the training loss of the first / last step window is shown
    assert cells[0][4].strip() == "3.900 -> 3.400 (caption)"
    assert cells[3][4].strip() == "2.400 -> 1.900 (chat)"
    ppl3 = f"{math.exp(BASE_TEXT_LOSS + 0.1):.4f} -> {math.exp(BASE_TEXT_LOSS + 0.2):.4f}"
    assert cells[2][6].strip() == ppl3
    assert "Held-out accuracy" not in md
    assert "loss:" not in capsys.readouterr().err


def test_report_includes_accuracy_and_names_missing_metrics(tmp_path):
    fake_run(tmp_path, steps=3)
    acc = {"n": 10, "correct": 7, "accuracy": 0.7, "chance": 0.25, "majority": 0.4,
           "per_kind": {"count": {"n": 10, "accuracy": 0.7, "chance": 0.25, "majority": 0.4}}}
    (tmp_path / "accuracy.json").write_text(json.dumps(acc))
    md = write_report(tmp_path)["summary"].read_text()
    assert "7/10 = **70.0%** (chance 25.0%, majority answer 40.0%)" in md
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path / "nowhere")
