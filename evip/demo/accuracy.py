"""Accuracy on the held-out multiple-choice questions, against chance.

How a question is answered: by the likelihood of each option, not by free generation (a tiny
model trained for minutes rarely produces the exact word, but it can already rank the options).
Each option becomes the one-turn chat {human: "<image>\\n{question}", gpt: option} and goes
through the training sample builder (evip/data/sample.py: the same chat template, image tiles and
system prompt as S2), so the model is asked exactly as it was taught. An option's score is the
SUM of the log-probabilities of its trained tokens: the answer and its `<|im_end|>` (so "1"
cannot win by being a prefix of "12"). The best-scoring option is the answer; ties go to the
first option.

Baselines: `chance` is the expected accuracy of a uniform random pick (mean of 1 / options);
`majority` is the accuracy of always answering each question kind's most frequent right answer
(the best a model that ignores the image can do by learning the answer prior).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from evip.batch import IGNORE_INDEX

# A scorer maps (question record, its encoded image) to one score per option (higher = likelier).
Scorer = Callable[[dict, bytes], Sequence[float]]


@dataclass
class AccuracyResult:
    n: int
    correct: int
    accuracy: float
    chance: float
    majority: float
    per_kind: dict[str, dict] = field(default_factory=dict)   # kind -> {n, accuracy, chance, majority}

    def to_dict(self) -> dict:
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy, "chance": self.chance,
                "majority": self.majority, "per_kind": self.per_kind}


def load_questions(path: str | Path) -> list[dict]:
    """Held-out questions as written by `evip demo-data` (image paths relative to the file)."""
    path = Path(path)
    questions = json.loads(path.read_text())
    for q in questions:
        q["image_path"] = str(path.parent / q["image"])
    return questions


def _baselines(questions: Sequence[dict]) -> tuple[float, float]:
    chance = sum(1 / len(q["options"]) for q in questions) / len(questions)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for q in questions:
        by_kind[q["kind"]][q["options"][q["answer"]]] += 1
    majority = sum(c.most_common(1)[0][1] for c in by_kind.values()) / len(questions)
    return chance, majority


def evaluate(questions: Sequence[dict], scorer: Scorer) -> AccuracyResult:
    """Answer every question with `scorer` (argmax over options) and compare with the baselines."""
    if not questions:
        raise ValueError("no held-out questions to evaluate")
    hits: dict[str, list[bool]] = defaultdict(list)
    for q in questions:
        scores = list(scorer(q, Path(q["image_path"]).read_bytes()))
        if len(scores) != len(q["options"]):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(q['options'])} options "
                             f"of question {q.get('id')}")
        pick = max(range(len(scores)), key=lambda i: (scores[i], -i))
        hits[q["kind"]].append(pick == q["answer"])
    chance, majority = _baselines(questions)
    per_kind = {}
    for kind, h in sorted(hits.items()):
        qs = [q for q in questions if q["kind"] == kind]
        c, m = _baselines(qs)
        per_kind[kind] = {"n": len(h), "accuracy": sum(h) / len(h), "chance": c, "majority": m}
    correct = sum(sum(h) for h in hits.values())
    return AccuracyResult(len(questions), correct, correct / len(questions), chance, majority, per_kind)


class ModelOptionScorer:
    """Scores options by their log-likelihood under a MonoInternVL model (see module docstring).

    `builder` is an evip.data.sample.SampleBuilder for the model's tokenizer and config. All
    options of a question go through one forward pass, as rows of a padded batch.
    """

    def __init__(self, model, builder):
        self.model = model
        self.builder = builder
        self.pad_id = model.cfg.pad_token_id

    def samples(self, question: dict, image: bytes) -> list:
        from evip.data.record import Record
        human = {"from": "human", "value": f"<image>\n{question['question']}"}
        return [self.builder(Record(key=f"{question.get('id', '?')}#{i}", source="heldout",
                                    shard=str(question.get("image_path", "")), kind="chat", images=[image],
                                    conversations=[human, {"from": "gpt", "value": option}]))
                for i, option in enumerate(question["options"])]

    @torch.no_grad()
    def __call__(self, question: dict, image: bytes) -> list[float]:
        samples = self.samples(question, image)
        width = max(len(s) for s in samples)
        b = len(samples)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        seq_ids = torch.full((b, width), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            input_ids[i, :len(s)] = s.input_ids
            labels[i, :len(s)] = s.labels
            seq_ids[i, :len(s)] = 0
        position_ids = torch.arange(width).expand(b, width).contiguous()
        dtype = next(self.model.parameters()).dtype
        pixels = torch.cat([s.pixel_values for s in samples]).to(dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(input_ids, position_ids=position_ids, seq_ids=seq_ids,
                                pixel_values=pixels).logits.float()
        finally:
            self.model.train(was_training)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:]
        mask = target != IGNORE_INDEX
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(dim=1).tolist()


def heldout_accuracy(model, builder, questions_path: str | Path, limit: int | None = None) -> AccuracyResult:
    """The demo's final number: option-likelihood accuracy of `model` on the held-out questions."""
    questions = load_questions(questions_path)[:limit]
    return evaluate(questions, ModelOptionScorer(model, builder))
