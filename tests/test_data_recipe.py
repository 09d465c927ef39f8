"""Recipes: typed, validated before any DataLoader worker starts, errors naming key and file."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_stream_helpers import make_shards, write_recipe
from evip.config import ConfigError
from evip.data.loader import DataConfig, build_loader
from evip.data.recipe import load_recipe

RECIPES = Path(__file__).parents[1] / "data_recipes"


@pytest.fixture
def shards(tmp_path):
    make_shards(tmp_path, "a", 2, 3)
    return str(tmp_path / "a-*.tar")


@pytest.mark.parametrize("change,key,words", [
    ({"paths": ["/nowhere/x-{000..009}.tar"]}, "sources.1.paths.0", "/nowhere/x-{000..009}.tar"),
    ({"weight": 0.0}, "sources.1.weight", "> 0"),
    ({"weight": -1.0}, "sources.1.weight", "> 0"),
    ({"template": "llama-chat"}, "sources.1.template", "llama-chat"),
    ({"kind": "video"}, "sources.1.kind", "video"),
    ({"format": "tfrecord"}, "sources.1.format", "tfrecord"),
    ({"filters": {"min_sides": 3}}, "sources.1.filters", "min_sides"),
    ({"wieght": 1.0}, "wieght", "unknown key"),   # evip/config.py names the key, not its list index
])
def test_bad_recipe_fails_before_any_worker_naming_the_key(tmp_path, shards, change, key, words):
    good = {"name": "ok", "paths": [shards]}
    bad = {"name": "bad", "paths": [shards], **change}
    recipe = write_recipe(tmp_path / "r.yaml", [good, bad])
    with pytest.raises(ConfigError) as e:
        build_loader(DataConfig(recipe=str(recipe), num_workers=2), None, None, 0, 1)
    msg = str(e.value)
    assert key in msg and words in msg and str(recipe) in msg, msg


@pytest.mark.parametrize("name", ["s1_1_concept", "s1_2_semantic", "s1_3_alignment", "s2_instruct"])
def test_paper_stage_recipes_name_the_root_to_fill_in(name, tmp_path):
    path = RECIPES / f"{name}.yaml"
    with pytest.raises(ConfigError, match=r"'sources\.0\.root' is missing"):
        load_recipe(path)
    # filled in, the recipe validates down to the shards (here: none exist there yet)
    overrides = [f"sources.{i}.root={tmp_path}" for i in range(3)]
    recipe_len = len(load_recipe_raw(path))
    with pytest.raises(ConfigError, match=r"no shards match"):
        load_recipe(path, overrides[:recipe_len])


def load_recipe_raw(path):
    import yaml
    return yaml.safe_load(Path(path).read_text())["sources"]


def test_small_recipe_loads_with_defaults(tmp_path, shards):
    recipe = write_recipe(tmp_path / "r.yaml", [{"name": "a", "paths": [shards], "kind": "caption"}])
    r = load_recipe(recipe)
    assert r.sources[0].weight == 1.0 and r.sources[0].template == "" and r.sources[0].format == "webdataset"
