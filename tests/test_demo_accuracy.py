"""Held-out accuracy: argmax over option scores, chance and majority baselines, and the model
scorer's log-likelihoods checked against a plain one-sequence forward of a real tiny model."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
import tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from evip.data.images import ImageConfig
from evip.data.sample import SampleBuilder, SampleConfig
from evip.demo.accuracy import ModelOptionScorer, evaluate, load_questions
from evip.demo.make_data import DemoDataConfig, build_demo_data
from evip.model.mono import MonoInternVL
from evip.model.tokens import SPECIAL_TOKENS, IM_END, IM_START
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo_data(out, DemoDataConfig(n_s1_1=0, n_s1_2=0, n_s1_3=0, n_s2=0, n_heldout=40))
    return load_questions(out / "heldout/questions.json")


def word_tokenizer(questions) -> PreTrainedTokenizerFast:
    """A real (HF tokenizers) word-level tokenizer over the questions' words, plus chat/image tokens."""
    words = sorted({w for q in questions for t in [q["question"], *q["options"], "user assistant"]
                    for w in re.findall(r"\w+|[^\w\s]", t)})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "\n": 3, **{w: i + 4 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern=tokenizers.Regex(r"\w+|[^\w\s]|\n"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END, *SPECIAL_TOKENS]})
    return tok


def test_oracle_gets_everything_and_baselines_are_right(questions):
    oracle = evaluate(questions, lambda q, _: [float(i == q["answer"]) for i in range(len(q["options"]))])
    assert oracle.accuracy == 1.0 and oracle.correct == len(questions)
    wrong = evaluate(questions, lambda q, _: [float(i != q["answer"]) for i in range(len(q["options"]))])
    assert wrong.accuracy == 0.0
    expected_chance = sum(1 / len(q["options"]) for q in questions) / len(questions)
    assert oracle.chance == pytest.approx(expected_chance)
    assert 0.17 < oracle.chance < 0.3          # 4-6 options per question
    # ties go to the first option: a constant scorer scores the rate of answer index 0
    first = evaluate(questions, lambda q, _: [0.0] * len(q["options"]))
    assert first.accuracy == sum(q["answer"] == 0 for q in questions) / len(questions)
    assert set(oracle.per_kind) == {q["kind"] for q in questions}
    assert sum(v["n"] for v in oracle.per_kind.values()) == len(questions)


def test_majority_baseline_by_hand(questions):
    image = questions[0]["image_path"]
    qs = [{"kind": "count", "options": ["1", "2"], "answer": a, "image_path": image} for a in (0, 0, 1)] + \
         [{"kind": "colour", "options": ["red", "blue", "green"], "answer": 2, "image_path": image}]
    res = evaluate(qs, lambda q, _: [0.0] * len(q["options"]))
    assert res.majority == pytest.approx(3 / 4)          # "1" for counts (2 of 3) + "green" (1 of 1)
    assert res.chance == pytest.approx((3 * 0.5 + 1 / 3) / 4)
    assert res.accuracy == pytest.approx(2 / 4)


def test_model_scorer_equals_plain_log_likelihood(questions):
    tok = word_tokenizer(questions)
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=len(tok), img_context_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = MonoInternVL(cfg)
    builder = SampleBuilder(SampleConfig(max_length=256, image=ImageConfig(max_tiles=1, use_thumbnail=False)),
                            tok, cfg)
    scorer = ModelOptionScorer(model, builder)
    q = questions[0]
    image = open(q["image_path"], "rb").read()
    samples = scorer.samples(q, image)
    # the training chat template: the question after the image block, loss on option + <|im_end|> only
    text = tok.decode(samples[0].input_ids)
    assert text.count("<IMG_CONTEXT>") == cfg.tokens_per_tile and "<|im_start|>" in text
    end_id = tok.convert_tokens_to_ids(IM_END)
    for option, s in zip(q["options"], samples):
        trained = [t for t in s.labels.tolist() if t != -100]
        assert trained == tok(option, add_special_tokens=False)["input_ids"] + [end_id]
    scores = scorer(q, image)
    assert len(scores) == len(q["options"])
    for s, score in zip(samples, scores):
        with torch.no_grad():
            logp = torch.log_softmax(model(s.input_ids[None], pixel_values=s.pixel_values).logits[0].float(), -1)
        expected = sum(logp[j - 1, t].item() for j, t in enumerate(s.labels.tolist()) if t != -100)
        assert score == pytest.approx(expected, abs=1e-4)
    res = evaluate(questions[:10], scorer)
    assert res.n == 10 and 0 <= res.correct <= 10
    # batched (questions grouped by prompt length, up to `group` rows): the same scores
    images = [open(q["image_path"], "rb").read() for q in questions]
    one_by_one = [scorer(q, im) for q, im in zip(questions, images)]
    batched = scorer.score_many(questions, images, group=3)
    lengths = Counter(len(scorer._prepare(q, im).prompt) for q, im in zip(questions, images))
    assert len(lengths) > 1 and max(lengths.values()) > 3      # several groups, some split in chunks
    for a, b in zip(one_by_one, batched):
        assert b == pytest.approx(a, abs=1e-4)


def test_run_accuracy_from_a_run_dir(questions, tmp_path):
    """`evip report RUN --heldout Q` scores the last finished stage's weights with the run's tokenizer."""
    import dataclasses
    import json

    from evip.stage_weights import DONE, WEIGHTS, write_weights
    from evip.cli import main
    from evip.config import to_yaml
    from evip.stages import StageConfig

    tok = word_tokenizer(questions)
    torch.manual_seed(1)
    cfg = tiny_model_config(vocab_size=len(tok), img_context_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = MonoInternVL(cfg)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    tok.save_pretrained(str(tmp_path / "base" / "tokenizer"))
    from evip.data.loader import DataConfig
    stage = StageConfig(name="s2_instruct", trainable=["all"], steps=1, data=DataConfig(
        recipe="x.yaml", sample=SampleConfig(max_length=256, image=ImageConfig(max_tiles=1))))
    sdir = tmp_path / "stages" / "3_s2_instruct"
    sdir.mkdir(parents=True)
    (sdir / "stage.yaml").write_text(to_yaml(stage))
    write_weights({n: p.detach() for n, p in model.named_parameters()}, sdir / WEIGHTS)
    (sdir / DONE).write_text("")
    # a metrics line so that the report has something to plot
    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"kind": "train", "stage": "s2_instruct", "step": 1, "loss": 2.0, "loss_chat": 2.0, "tokens_total": 10,
         "tokens_per_s": 5.0, "data_wait_frac": 0.1, "step_time": 2.0}) + "\n")
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps([{k: v for k, v in q.items() if k != "image_path"} | {"image": q["image_path"]}
                                 for q in questions[:6]]))
    assert main(["report", str(tmp_path), "--heldout", str(qfile)]) == 0
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    expected = evaluate(load_questions(qfile), ModelOptionScorer(model, SampleBuilder(
        SampleConfig(max_length=256, image=ImageConfig(max_tiles=1)), tok, cfg)))
    assert acc["n"] == 6 and acc["correct"] == expected.correct and acc["stage"] == "3_s2_instruct"
    assert "Held-out accuracy" in (tmp_path / "report" / "summary.md").read_text()
