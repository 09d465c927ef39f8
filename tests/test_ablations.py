"""`evip ablate`: variants of one pipeline, each run by `evip run` and measured the same way.

A tiny random model stands in for the LLM (what it learns is not the point here; the demo's
`make ablations` is): the runner must write its table, plot and JSON, print the JSON last, keep the
frozen-LLM variant's text loss bit-identical (and the fully trained one's not), and continue an
interrupted ablation without rerunning measured variants."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_pipeline_helpers import ROOT, clean_env, tiny_inputs

from evip.ablations import load_ablation
from evip.config import ConfigError

EVALS = ["stages_all.eval.text_corpus=pydoc", "stages_all.eval.text_batches=1", "stages_all.eval.text_seq_len=32",
         "stages_all.eval.heldout_data.recipe=demo/recipes/heldout_captions.yaml", "stages_all.eval.heldout_batches=1",
         "stages_all.eval.heldout_data.token_budget=64", "stages_all.eval.heldout_data.sample.max_length=64",
         "stages_all.eval.heldout_data.num_workers=0", "stages_all.eval.heldout_data.sample.image.max_tiles=1",
         "stages_all.eval.heldout_data.sample.image.use_thumbnail=false", "stages_all.steps=2",
         "stages_all.data.recipe=data_recipes/local_tiny.yaml"]


def write_ablation(tmp_path, data):
    (tmp_path / "s1.yaml").write_text(f"""
defaults: [{ROOT}/stages/pipeline_tiny.yaml]
name: tiny_s1
stages:
  - {{name: s1_1_concept, file: {ROOT}/stages/s1_1_concept.yaml}}
  - {{name: s1_2_semantic, file: {ROOT}/stages/s1_2_semantic.yaml}}
""")
    (tmp_path / "ablations.yaml").write_text(f"""
name: tiny ablations
pipeline: s1.yaml
overrides: {json.dumps(EVALS)}
probes: {data}/heldout/probes.json
probe_limit: 6
variants:
  - {{name: frozen, studies: [frozen_llm, data_scaling], label: frozen LLM}}
  - {{name: full, studies: [frozen_llm], label: full fine-tuning, overrides: ["stages_all.trainable=[all]"]}}
  - {{name: no_expert, studies: [visual_expert], overrides: [model.visual_ffn=none, "stages_all.trainable=[patch_embed]"]}}
  - {{name: less_data, studies: [data_scaling], overrides: [s1_1_concept.steps=1]}}
""")
    return tmp_path / "ablations.yaml"


@pytest.mark.slow
def test_ablate_tiny(tmp_path):
    env, overrides = tiny_inputs(tmp_path / "inputs")
    data = env["EVIP_DEMO_DATA"]
    ablation = write_ablation(tmp_path, data)
    run = tmp_path / "run"
    keep = [o for o in overrides if o.startswith(("base.tokenizer", "model.img_context_token_id"))]
    cmd = [sys.executable, "-m", "evip.cli", "ablate", str(ablation), "--run-dir", str(run), *keep]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])          # the last line: every variant's figures
    v = summary["variants"]
    assert list(v) == ["frozen", "full", "no_expert", "less_data"]
    assert json.loads((run / "ablations.json").read_text()) == summary
    assert v["frozen"]["text_identical"] and v["frozen"]["text_loss"] == v["frozen"]["text_loss_base"]
    assert v["no_expert"]["text_identical"]
    assert not v["full"]["text_identical"] and v["full"]["text_loss_change"] != 0
    assert v["less_data"]["steps"] == 3 and v["frozen"]["steps"] == 4
    assert v["less_data"]["samples"] < v["frozen"]["samples"]
    assert v["full"]["trainable_params"] > v["frozen"]["trainable_params"] > v["no_expert"]["trainable_params"]
    for m in v.values():
        assert set(m["probe"]) == {"colour", "shape"} and m["probe_n"] == 6
        assert m["image_gain"] == pytest.approx(m["heldout_caption_loss_other_image"] - m["heldout_caption_loss"])
    table = (run / "ablations.md").read_text()
    assert all(label in table for label in ("frozen LLM", "full fine-tuning", "no_expert", "less_data"))
    assert table.count("(identical)") == 4 and "## Data scaling" in table     # frozen is in two studies
    assert (run / "ablations.png").stat().st_size > 10_000
    # rerun: every variant was measured, nothing runs again, the same figures come out
    again = subprocess.run(cmd, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("measured already") == 4
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary


def test_ablation_file_errors(tmp_path):
    ablation = write_ablation(tmp_path, tmp_path)
    text = ablation.read_text()
    ablation.write_text(text.replace("name: less_data", "name: frozen"))
    with pytest.raises(ConfigError, match="variant name 'frozen' appears twice"):
        load_ablation(ablation)
    ablation.write_text(text.replace("overrides: [s1_1_concept.steps=1]", "overrides: [s1_1_concept.stepz=1]"))
    with pytest.raises(ConfigError, match="variant 'less_data' .*stepz"):
        load_ablation(ablation)
    ablation.write_text(text.replace("studies: [visual_expert], ", ""))
    with pytest.raises(ConfigError, match="variant 'no_expert' .* has no 'studies'"):
        load_ablation(ablation)


def test_probes_are_relative_to_the_ablation_file(tmp_path, monkeypatch):
    from evip.ablations import probes_path

    (tmp_path / "cfg").mkdir()
    ablation = write_ablation(tmp_path / "cfg", "data")        # probes: data/heldout/probes.json
    la = load_ablation(ablation)
    with pytest.raises(ConfigError, match="'probes' in .*not found beside the file"):
        probes_path(la)
    elsewhere = tmp_path / "cwd"
    (elsewhere / "data/heldout").mkdir(parents=True)
    (elsewhere / "data/heldout/probes.json").write_text("[]")
    monkeypatch.chdir(elsewhere)
    with pytest.warns(UserWarning, match="'probes' .* is read from the working directory"):
        assert probes_path(la).resolve() == \
            (elsewhere / "data/heldout/probes.json").resolve()  # the working directory's, when only it has one
    (tmp_path / "cfg/data/heldout").mkdir(parents=True)
    (tmp_path / "cfg/data/heldout/probes.json").write_text("[]")
    assert probes_path(la) == tmp_path / "cfg/data/heldout/probes.json"   # beside the file wins
