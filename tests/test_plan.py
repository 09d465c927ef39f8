"""`evip plan` and `evip run`: config errors named by key before any heavy work; the plan's numbers."""
from __future__ import annotations

import pytest

from evip.cli import main
from evip.commands.plan import plan_rows, stage_memory
from evip.model.groups import named_groups
from evip.model.meta_load import build_empty
from evip.pipeline import load_pipeline, planned_model_config
from trainer_helpers import TINY


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from data_stream_helpers import make_shards, write_recipe
    root = tmp_path_factory.mktemp("plan")
    make_shards(root, "cap", 1, 2)
    return write_recipe(root / "r.yaml", [{"name": "cap", "kind": "caption", "paths": [str(root / "cap-*.tar")]}])


@pytest.mark.parametrize("overrides, key", [
    (["s1_1_concept.trainable=[patch_embed,visual_attn]"], "'trainable.1'"),   # matches no parameter
    (["s2_instruct.trainable=[]"], "'trainable'"),                            # trains nothing
    (["s1_3_alignment.trainable=[attn]"], "'trainable.0'"),                    # unknown group
    (["s1_2_semantic.zero_stage=4"], "'zero_stage'"),
    ([], "'data.recipe'"),                                                     # recipe left ???
    (["stages_all.data.recipe=/no/such/recipe.yaml"], "'data.recipe'"),        # recipe file missing
])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_config_errors_name_the_key(command, overrides, key, recipe, tmp_path, capsys):
    if key != "'data.recipe'":
        overrides = [f"stages_all.data.recipe={recipe}", *overrides]
    extra = ["--run-dir", str(tmp_path / "run")] if command == "run" else []
    assert main([command, str(TINY), *extra, *overrides]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and key in err
    assert not (tmp_path / "run").exists()                  # nothing was started


def test_plan_counts_and_memory(recipe, capsys):
    lp = load_pipeline(TINY, [f"stages_all.data.recipe={recipe}"])
    groups = {g: sum(p.numel() for _, p in ps) for g, ps in named_groups(build_empty(planned_model_config(lp))).items()}
    rows = plan_rows(lp, world_size=2)
    assert [r["stage"] for r in rows] == ["s1_1_concept", "s1_2_semantic", "s1_3_alignment", "s2_instruct"]
    assert rows[0]["trainable_params"] == groups["patch_embed"] + groups["visual_ffn"]
    assert rows[2]["trainable_params"] == rows[0]["trainable_params"] + groups["attention"]
    assert rows[3]["trainable_params"] == sum(groups.values()) and rows[3]["frozen"] == {}
    assert rows[0]["steps"] == 4 and rows[0]["tokens"] == 4 * 64 * 2
    m = stage_memory(total=100, trainable=10, zero=2, precision="bf16", world=2)
    assert m == {"weights": 200 + 20, "grads": 10, "optimizer": 40, "total": 270}
    assert main(["plan", str(TINY), f"stages_all.data.recipe={recipe}", "--world-size", "2"]) == 0
    assert "[s1_3_alignment] ZeRO-2 fp32" in capsys.readouterr().out


def test_run_takes_overrides_before_and_after_run_dir():
    from evip.cli import build_parser
    a = build_parser().parse_args(["run", "p.yaml", "seed=1", "--run-dir", "d", "s2_instruct.steps=3"])
    assert a.overrides == ["seed=1"] and a.run_dir == ["d", "s2_instruct.steps=3"]
