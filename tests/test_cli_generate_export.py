"""`evip generate` and `evip export` on a real tiny run (real loader, real SmolLM2 tokenizer, one
stage trained by the real trainer): answers are text and reproducible, the prompt is the training
chat template, the export reloads bit-exactly, errors name the cause."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evip.cli import main
from evip.inference import PromptBuilder, latest_weights, run_tokenizer, stage_sample_config
from evip.pipeline import load_pipeline, run_pipeline
from trainer_helpers import prepared_tokenizer, write_e2e_pipeline

STAGE = "s1_1_concept"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    os.environ["WANDB_MODE"] = "disabled"
    root = tmp_path_factory.mktemp("genexp")
    tok = prepared_tokenizer(tmp_path_factory.getbasetemp())
    pipe = write_e2e_pipeline(root, tok, stages=(STAGE,), steps=2)
    run_pipeline(load_pipeline(pipe), root / "run")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(root / "red.png")
    Image.new("RGB", (40, 70), (20, 30, 220)).save(root / "blue.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def _generate(capsys, run, *extra):
    rc = main(["generate", "--run-dir", str(run / "run"), "--max-new-tokens", "6", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_answers_deterministically(run, capsys):
    img = ["--image", str(run / "red.png"), "--prompt", "What colour is the square?"]
    rc, greedy, err = _generate(capsys, run, *img)
    assert rc == 0, err
    assert greedy.strip()                                  # decoded text, not only special tokens
    assert f"weights of 0_{STAGE}" in err
    sampled = [_generate(capsys, run, *img, "--temperature", "1.0", "--top-p", "0.9", "--seed", str(s))[1]
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2] and sampled[0].strip()   # same seed, same answer
    rc, text_only, err = _generate(capsys, run, "--prompt", "Say hello.")   # no image
    assert rc == 0 and text_only.strip(), err
    rc, two, err = _generate(capsys, run, "--image", str(run / "red.png"), "--image", str(run / "blue.png"),
                             "--prompt", "<image>\nand\n<image>\nCompare.")
    assert rc == 0 and two.strip(), err


def test_prompt_is_the_training_chat_template(run):
    w = latest_weights(run / "run")
    assert w.stage == f"0_{STAGE}" and w.in_progress is None
    tok = run_tokenizer(run / "run")
    p = PromptBuilder(w, tok).build("Hi?", [(run / "red.png").read_bytes()])
    n_img = w.model_cfg.tokens_per_tile                      # max_tiles=1: one tile
    expected = ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * n_img + "</img>\nHi?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tok.decode(p.input_ids[0].tolist()) == expected
    assert p.pixel_values.dtype == torch.uint8 and p.pixel_values.shape == (1, 3, 56, 56)
    assert p.stop_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_generate_errors_name_the_cause(run, capsys, tmp_path):
    rc, _, err = _generate(capsys, run, "--image", str(run / "broken.png"), "--prompt", "x")
    assert rc == 1 and "broken.png" in err and "cannot be read as an image" in err
    rc, _, err = _generate(capsys, run, "--image", str(run / "nope.png"), "--prompt", "x")
    assert rc == 1 and "nope.png not found" in err
    rc = main(["generate", "--run-dir", str(tmp_path / "missing"), "--prompt", "x"])
    assert rc == 1 and "does not exist" in capsys.readouterr().err
    rc = main(["generate", "--run-dir", str(run / "run"), "--prompt", "x", "--stage", "s2_instruct"])
    assert rc == 1 and "stage 's2_instruct' not found" in capsys.readouterr().err


def test_stage_in_progress_uses_its_checkpoint_exactly(run, capsys, tmp_path):
    """A stage killed before its end has checkpoints but no DONE / model.safetensors: its latest
    checkpoint, consolidated, equals what the stage end would have written (same step)."""
    killed = tmp_path / "killed"
    shutil.copytree(run / "run", killed)
    sdir = killed / "stages" / f"0_{STAGE}"
    for name in ("DONE", "model.safetensors"):
        (sdir / name).unlink()
    w = latest_weights(killed)
    assert (w.stage, w.step, w.in_progress) == (f"0_{STAGE}", 2, f"0_{STAGE}")
    trained = load_file(str(run / "run" / "stages" / f"0_{STAGE}" / "model.safetensors"))
    state = dict(w.build().named_parameters())
    assert set(state) == set(trained)
    assert all(torch.equal(state[k].detach(), trained[k]) for k in trained)
    rc = main(["generate", "--run-dir", str(killed), "--prompt", "x", "--max-new-tokens", "2"])
    assert rc == 0 and "in progress, checkpoint step 2" in capsys.readouterr().err
    shutil.rmtree(sdir / "ckpt")                        # killed before its first checkpoint
    rc = main(["generate", "--run-dir", str(killed), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 1 and f"no trained weights yet: stage 0_{STAGE} is in progress and has written no checkpoint" in err
    rc = main(["generate", "--run-dir", str(killed), "--prompt", "x", "--stage", "base", "--max-new-tokens", "2"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_reloads_exactly(run, capsys, tmp_path, dtype):
    from transformers import AutoTokenizer

    from evip.model.weights import load_mono2b

    out = tmp_path / "export"
    assert main(["export", str(run / "run"), str(out), "--dtype", dtype]) == 0, capsys.readouterr().err
    trained = load_file(str(run / "run" / "stages" / f"0_{STAGE}" / "model.safetensors"))
    model, cfg = load_mono2b(out)
    assert cfg == latest_weights(run / "run").model_cfg
    want = torch.float32 if dtype == "fp32" else torch.bfloat16
    state = dict(model.named_parameters())
    assert set(state) == set(trained)
    for name, t in trained.items():
        assert state[name].dtype == want and torch.equal(state[name].detach(), t.to(want)), name
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == run_tokenizer(run / "run").get_vocab()
    assert main(["export", str(run / "run"), str(out)]) == 1                # never overwrites
    assert "not an empty directory" in capsys.readouterr().err
    # served as trained: the stage's tiling, the training chat prompt, stop at the turn end
    w = latest_weights(run / "run")
    image = stage_sample_config(w).image
    config = json.loads((out / "config.json").read_text())
    assert (config["dynamic_image_size"], config["min_dynamic_patch"], config["max_dynamic_patch"],
            config["use_thumbnail"]) == (True, image.min_tiles, image.max_tiles, image.use_thumbnail)
    assert config["vision_config"]["model_type"] == "intern_vit_patch"
    rendered = tok.apply_chat_template([{"role": "user", "content": "<image>\nHi?"}], tokenize=False,
                                       add_generation_prompt=True)
    block = "<img>" + "<IMG_CONTEXT>" * w.model_cfg.tokens_per_tile + "</img>"   # what the servers put for <image>
    trained = PromptBuilder(w, run_tokenizer(run / "run")).build("Hi?", [(run / "red.png").read_bytes()])
    assert rendered.replace("<image>", block) == tok.decode(trained.input_ids[0].tolist())
    assert tok(rendered.replace("<image>", block), add_special_tokens=False)["input_ids"] == trained.input_ids[0].tolist()
    generation = json.loads((out / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]


def test_export_copies_the_released_modelling_files(run, capsys, tmp_path):
    from evip.model.serving import REMOTE_CODE

    code = tmp_path / "Mono-InternVL-2B"
    code.mkdir()
    assert main(["export", str(run / "run"), str(tmp_path / "a"), "--remote-code", str(code)]) == 1
    assert "lacks configuration_internvl_chat.py" in capsys.readouterr().err and not (tmp_path / "a").exists()
    for name in (n for n in REMOTE_CODE if n != "conversation.py"):
        (code / name).write_text(f"# {name}\n")
    assert main(["export", str(run / "run"), str(tmp_path / "a"), "--remote-code", str(code)]) == 1
    assert "lacks conversation.py" in capsys.readouterr().err and not (tmp_path / "a").exists()
    for name in REMOTE_CODE:
        (code / name).write_text(f"# {name}\n")
    assert main(["export", str(run / "run"), str(tmp_path / "b"), "--remote-code", str(code)]) == 0
    assert all((tmp_path / "b" / name).read_text() == f"# {name}\n" for name in REMOTE_CODE)


@pytest.mark.slow
def test_checkpoint_consolidation_is_exact_under_zero3_bf16(tmp_path):
    """bf16 + ZeRO-3, all four stages (S2 trains everything): each stage's last checkpoint,
    consolidated as for a stage in progress, equals the weights the stage end wrote."""
    from evip.checkpoint import latest_checkpoint
    from evip.stage_weights import WEIGHTS
    from evip.inference import RunWeights, stage_dirs
    from trainer_helpers import TINY, generated_factory

    os.environ["WANDB_MODE"] = "disabled"
    lp = load_pipeline(TINY, ["stages_all.data.recipe=unused.yaml", "stages_all.precision=bf16",
                              "stages_all.zero_stage=3"])
    run_pipeline(lp, tmp_path, loader_factory=generated_factory)
    dirs = stage_dirs(tmp_path)
    assert len(dirs) == 4
    for k, d in enumerate(dirs):
        inputs = dirs[k - 1] / WEIGHTS if k else tmp_path / "base" / WEIGHTS
        w = RunWeights(tmp_path, latest_checkpoint(d / "ckpt"), d.name, d, d.name,
                       latest_weights(tmp_path).model_cfg, step=4, input_weights=inputs)
        state = dict(w.build().named_parameters())
        ref = load_file(str(d / WEIGHTS))
        assert [n for n in ref if not torch.equal(state[n].detach(), ref[n])] == [], d.name
