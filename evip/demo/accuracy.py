"""Accuracy on the held-out multiple-choice questions, against chance.

How a question is answered: by the likelihood of each option, not by free generation (a tiny
model trained for minutes rarely produces the exact word, but it can already rank the options).
The model reads the chat prompt

    <|im_start|>user\\n<img><IMG_CONTEXT> x (tokens_per_tile * tiles)</img>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n

and each option is scored by the SUM of the log-probabilities of its tokens followed by
`<|im_end|>` (the whole answer, end included, so "1" cannot win by being a prefix of "12").
The option with the highest score is the answer; ties go to the first option.

Baselines: `chance` is the expected accuracy of a uniform random pick (mean of 1 / options);
`majority` is the accuracy of always answering each question kind's most frequent right answer
(what a model that ignores the image can reach at best by learning the answer prior).
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from evip.batch import IGNORE_INDEX
from evip.model.tokens import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

# A scorer maps (question record, its image tiles) to one score per option (higher = likelier).
Scorer = Callable[[dict, torch.Tensor], Sequence[float]]


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


def evaluate(questions: Sequence[dict], scorer: Scorer, image_tiles: Callable[[dict], torch.Tensor]
             ) -> AccuracyResult:
    """Answer every question with `scorer` (argmax over options) and compare with the baselines."""
    if not questions:
        raise ValueError("no held-out questions to evaluate")
    hits: dict[str, list[bool]] = defaultdict(list)
    for q in questions:
        scores = list(scorer(q, image_tiles(q)))
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

    All options of a question go through one forward pass as rows of a padded batch.
    """

    def __init__(self, model, tokenizer):
        self.model = model
        self.tok = tokenizer
        self.tokens_per_tile = model.cfg.tokens_per_tile
        self.pad_id = model.cfg.pad_token_id
        self.end_ids = self._ids(IM_END)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, question: str, n_tiles: int) -> list[int]:
        image = IMG_START + IMG_CONTEXT * (self.tokens_per_tile * n_tiles) + IMG_END
        return self._ids(f"{IM_START}user\n{image}\n{question}{IM_END}\n{IM_START}assistant\n")

    @torch.no_grad()
    def __call__(self, question: dict, tiles: torch.Tensor) -> list[float]:
        prompt = self.prompt_ids(question["question"], tiles.shape[0])
        answers = [self._ids(opt) + self.end_ids for opt in question["options"]]
        width = len(prompt) + max(len(a) for a in answers)
        b = len(answers)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        seq_ids = torch.full((b, width), -1, dtype=torch.long)
        for i, ans in enumerate(answers):
            n = len(prompt) + len(ans)
            input_ids[i, :n] = torch.tensor(prompt + ans)
            labels[i, len(prompt):n] = torch.tensor(ans)
            seq_ids[i, :n] = 0
        position_ids = torch.arange(width).expand(b, width).contiguous()
        dtype = next(self.model.parameters()).dtype
        pixels = tiles.to(dtype).repeat(b, 1, 1, 1)
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


def image_loader(image_processor) -> Callable[[dict], torch.Tensor]:
    """Question -> its image tiles through the training image pipeline (evip/data/images.py)."""
    def tiles(question: dict) -> torch.Tensor:
        return image_processor(Path(question["image_path"]).read_bytes())
    return tiles


def heldout_accuracy(model, tokenizer, image_processor, questions_path: str | Path,
                     limit: int | None = None) -> AccuracyResult:
    """The demo's final number: option-likelihood accuracy of `model` on the held-out questions."""
    questions = load_questions(questions_path)[:limit]
    return evaluate(questions, ModelOptionScorer(model, tokenizer), image_loader(image_processor))
