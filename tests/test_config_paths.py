"""The path rule (every file a config names is relative to the file that names it), the named
asset `smollm2`, and `steps=` replacing a stage file's `tokens` (the one set last wins)."""
from __future__ import annotations

import warnings

import pytest

from evip.config import ConfigError
from evip.pipeline import load_pipeline
from trainer_helpers import ROOT


def write_tree(tmp_path):
    """cfg/pipeline.yaml names ../stages/s.yaml and recipes/r.yaml (beside the pipeline); the stage
    file names its held-out recipe beside itself."""
    (tmp_path / "cfg" / "recipes").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    for p in (tmp_path / "cfg" / "recipes" / "r.yaml", tmp_path / "stages" / "held.yaml", tmp_path / "stages" / "img.png"):
        p.write_text("x")
    (tmp_path / "stages" / "s.yaml").write_text(
        "name: s\ntrainable: [patch_embed]\ntokens: 1000\nprecision: fp32\n"
        "data: {recipe: '???'}\neval: {heldout_data: {recipe: held.yaml}, caption_images: [img.png]}\n")
    (tmp_path / "cfg" / "pipeline.yaml").write_text(
        "base: {source: random}\nstages:\n  - {name: s, file: ../stages/s.yaml, overrides: [data.recipe=recipes/r.yaml]}\n")
    return tmp_path / "cfg" / "pipeline.yaml"


def test_paths_are_relative_to_the_file_that_names_them(tmp_path, monkeypatch):
    pipe = write_tree(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)                                   # the working directory plays no part
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stage = load_pipeline(pipe).stages[0][0]
    assert stage.data.recipe == str(tmp_path / "cfg" / "recipes" / "r.yaml")       # named in the pipeline
    assert stage.eval.heldout_data.recipe == str(tmp_path / "stages" / "held.yaml")  # named in the stage file
    assert stage.eval.caption_images == [str(tmp_path / "stages" / "img.png")]
    # on the command line: the working directory
    (elsewhere / "mine.yaml").write_text("x")
    stage = load_pipeline(pipe, ["s.data.recipe=mine.yaml"]).stages[0][0]
    assert stage.data.recipe == str(elsewhere / "mine.yaml")
    # a path that only exists from the working directory (configs older than the rule): read from there, warned
    (tmp_path / "cfg" / "pipeline.yaml").write_text(
        "stages:\n  - {name: s, file: ../stages/s.yaml, overrides: [data.recipe=elsewhere/mine.yaml]}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="'data.recipe' 'elsewhere/mine.yaml' in .*pipeline.yaml is read from the working directory"):
        stage = load_pipeline(pipe).stages[0][0]
    assert stage.data.recipe == str(tmp_path / "elsewhere" / "mine.yaml")
    # a missing one is looked for beside its file, and the error says where
    (tmp_path / "cfg" / "pipeline.yaml").write_text(
        "stages:\n  - {name: s, file: ../stages/s.yaml, overrides: [data.recipe=nope.yaml]}\n")
    assert load_pipeline(pipe).stages[0][0].data.recipe == str(tmp_path / "cfg" / "nope.yaml")


def test_named_asset_and_steps_replace_tokens(tmp_path, capsys):
    from evip.assets import smollm2, smollm2_gguf
    pipe = write_tree(tmp_path)
    lp = load_pipeline(pipe, ["base.source=smollm2", "base.tokenizer=asset:smollm2-gguf"])
    assert (lp.cfg.base.source, lp.cfg.base.tokenizer) == (str(smollm2()), str(smollm2_gguf()))
    with pytest.raises(ConfigError, match="unknown asset 'asset:smollm3': one of asset:smollm2, asset:smollm2-gguf"):
        load_pipeline(pipe, ["base.source=asset:smollm3"])
    # the stage file says tokens: 1000; steps=5 alone replaces it, and tokens= given later wins back
    assert (lambda s: (s.steps, s.tokens))(load_pipeline(pipe).stages[0][0]) == (0, 1000)
    assert (lambda s: (s.steps, s.tokens))(load_pipeline(pipe, ["s.steps=5"]).stages[0][0]) == (5, 0)
    assert (lambda s: (s.steps, s.tokens))(load_pipeline(pipe, ["s.steps=5", "s.tokens=64"]).stages[0][0]) == (0, 64)
    assert (lambda s: (s.steps, s.tokens))(load_pipeline(pipe, ["stages_all.steps=3"]).stages[0][0]) == (3, 0)


def test_plan_states_the_length_rule(tmp_path, capsys):
    from data_stream_helpers import make_shards, write_recipe
    from evip.cli import main
    make_shards(tmp_path, "cap", 1, 2)
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "cap", "kind": "caption", "paths": ["cap-*.tar"]}])
    assert main(["plan", str(ROOT / "stages" / "pipeline_tiny.yaml"), f"stages_all.data.recipe={recipe}",
                 "s1_1_concept.steps=9"]) == 0
    out = capsys.readouterr().out
    assert "the one set last wins" in out and "length: steps=9: ends after 9 optimizer steps" in out


@pytest.mark.parametrize("empty", ['""', "''"])
def test_an_empty_path_value_in_a_file_is_empty_not_a_file_name(tmp_path, empty):
    """`eval.text_corpus=""` in a pipeline's overrides turns the text eval off (stages/pipeline_tiny.yaml
    does this); the path rule must not read the quotes as a file name beside the pipeline."""
    pipe = write_tree(tmp_path)
    pipe.write_text(pipe.read_text().replace("overrides: [", f"overrides: [eval.text_corpus={empty}, "))
    assert load_pipeline(pipe).stages[0][0].eval.text_corpus == ""
    tiny = load_pipeline(ROOT / "stages" / "pipeline_tiny.yaml",
                         ["base.source=random", "stages_all.data.recipe=data_recipes/local_tiny.yaml"])
    assert {s.eval.text_corpus for s, _ in tiny.stages} == {""}
