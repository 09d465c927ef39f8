"""Held-out accuracy: argmax over option scores, chance and majority baselines, and the model
scorer's log-likelihoods checked against a plain one-sequence forward of a real tiny model."""
from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from evip.data.images import ImageConfig, ImageProcessor
from evip.demo.accuracy import ModelOptionScorer, evaluate, image_loader, load_questions
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
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END, *SPECIAL_TOKENS]})
    return tok


def test_oracle_gets_everything_and_baselines_are_right(questions):
    tiles = lambda q: torch.zeros(0)  # noqa: E731  (scorers below ignore the image)
    oracle = evaluate(questions, lambda q, _: [float(i == q["answer"]) for i in range(len(q["options"]))], tiles)
    assert oracle.accuracy == 1.0 and oracle.correct == len(questions)
    wrong = evaluate(questions, lambda q, _: [float(i != q["answer"]) for i in range(len(q["options"]))], tiles)
    assert wrong.accuracy == 0.0
    expected_chance = sum(1 / len(q["options"]) for q in questions) / len(questions)
    assert oracle.chance == pytest.approx(expected_chance)
    assert 0.17 < oracle.chance < 0.3          # 4-6 options per question
    # ties go to the first option: a constant scorer scores the rate of answer index 0
    first = evaluate(questions, lambda q, _: [0.0] * len(q["options"]), tiles)
    assert first.accuracy == sum(q["answer"] == 0 for q in questions) / len(questions)
    assert set(oracle.per_kind) == {q["kind"] for q in questions}
    assert sum(v["n"] for v in oracle.per_kind.values()) == len(questions)


def test_majority_baseline_by_hand():
    qs = [{"kind": "count", "options": ["1", "2"], "answer": a} for a in (0, 0, 1)] + \
         [{"kind": "colour", "options": ["red", "blue", "green"], "answer": 2}]
    res = evaluate(qs, lambda q, _: [0.0] * len(q["options"]), lambda q: torch.zeros(0))
    assert res.majority == pytest.approx(3 / 4)          # "1" for counts (2 of 3) + "green" (1 of 1)
    assert res.chance == pytest.approx((3 * 0.5 + 1 / 3) / 4)
    assert res.accuracy == pytest.approx(2 / 4)


def test_model_scorer_equals_plain_log_likelihood(questions):
    tok = word_tokenizer(questions)
    torch.manual_seed(0)
    cfg = tiny_model_config(vocab_size=len(tok), img_context_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    model = MonoInternVL(cfg)
    scorer = ModelOptionScorer(model, tok)
    tiles_of = image_loader(ImageProcessor(ImageConfig(max_tiles=1), tile_size=cfg.image_size))
    q = questions[0]
    tiles = tiles_of(q)
    assert tiles.shape == (1, 3, cfg.image_size, cfg.image_size)
    scores = scorer(q, tiles)
    assert len(scores) == len(q["options"])
    prompt = scorer.prompt_ids(q["question"], 1)
    assert prompt.count(cfg.img_context_token_id) == cfg.tokens_per_tile
    for option, score in zip(q["options"], scores):
        ans = tok(option, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(IM_END)]
        ids = torch.tensor([prompt + ans])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, pixel_values=tiles).logits[0].float(), -1)
        expected = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ans))
        assert score == pytest.approx(expected, abs=1e-4)
    res = evaluate(questions[:10], scorer, tiles_of)
    assert res.n == 10 and 0 <= res.correct <= 10
