"""Accuracy on the held-out multiple-choice questions, against chance.

How a question is answered: by the likelihood of each option, not by free generation (a tiny
model trained for minutes rarely produces the exact word, but it can already rank the options).
Each option becomes the one-turn chat {human: "<image>\\n{question}", gpt: option} and goes
through the training sample builder (evip/data/sample.py: the same chat template, image tiles and
system prompt as S2), so the model is asked exactly as it was taught. An option's score is the
SUM of the log-probabilities of its trained tokens: the answer and its `<|im_end|>` (so "1"
cannot win by being a prefix of "12"). The best-scoring option is the answer; ties go to the
first option.

Caption probes (`"form": "caption"`, heldout/probes.json) are answered the same way with each
option as the picture's caption (the caption template of S1): what a model that has only been
through S1.1/S1.2 can be asked (the ablations use them).

Baselines: `chance` is the expected accuracy of a uniform random pick (mean of 1 / options);
`majority` is the accuracy of always answering each question kind's most frequent right answer
(the best a model that ignores the image can do by learning the answer prior).
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

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
    images = [Path(q["image_path"]).read_bytes() for q in questions]
    many = getattr(scorer, "score_many", None)       # a batched scorer: same scores, fewer forwards
    all_scores = many(questions, images) if many else [scorer(q, im) for q, im in zip(questions, images)]
    for q, scores in zip(questions, all_scores):
        scores = list(scores)
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


class Prepared(NamedTuple):
    """One question for the scorer: the prompt shared by its options, the prompt's image tiles, and
    each option's continuation [options, width] with the mask of its trained tokens."""
    prompt: torch.Tensor
    pixels: torch.Tensor
    rest: torch.Tensor
    trained: torch.Tensor


class ModelOptionScorer:
    """Scores options by their log-likelihood under a MonoInternVL model (see module docstring).

    `builder` is an evip.data.sample.SampleBuilder for the model's tokenizer and config.
    """

    def __init__(self, model, builder):
        self.model = model
        self.builder = builder

    def samples(self, question: dict, image: bytes) -> list:
        """One sample per option: a one-turn chat answering the question, or (a caption probe,
        `"form": "caption"`) the option itself as the picture's caption."""
        from evip.data.record import Record
        where = dict(source="heldout", shard=str(question.get("image_path", "")), images=[image])
        if question.get("form") == "caption":
            return [self.builder(Record(key=f"{question.get('id', '?')}#{i}", kind="caption", text=option, **where))
                    for i, option in enumerate(question["options"])]
        human = {"from": "human", "value": f"<image>\n{question['question']}"}
        return [self.builder(Record(key=f"{question.get('id', '?')}#{i}", kind="chat",
                                    conversations=[human, {"from": "gpt", "value": option}], **where))
                for i, option in enumerate(question["options"])]

    @torch.no_grad()
    def score_many(self, questions: Sequence[dict], images: Sequence[bytes], group: int = 16) -> list[list[float]]:
        """`self(q, image)` for every question, batched: questions whose prompts have the same length
        run their prompts as one batch (up to `group` rows) into one KV cache, then every option of
        every question of the batch continues its own prompt's row in one more forward. The same
        arithmetic as one question at a time up to float rounding of the batched matmuls (the
        test compares both); ~10x fewer reads of the weights."""
        prepared = [self._prepare(q, im) for q, im in zip(questions, images)]
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(prepared):
            by_len[len(p.prompt)].append(i)
        scores: list[list[float]] = [[] for _ in questions]
        for idx in by_len.values():
            for start in range(0, len(idx), group):
                chunk = idx[start:start + group]
                for i, sc in zip(chunk, self._score_batch([prepared[i] for i in chunk])):
                    scores[i] = sc
        return scores

    def _prepare(self, question: dict, image: bytes) -> "Prepared":
        samples = self.samples(question, image)
        starts = [int((s.labels != IGNORE_INDEX).nonzero()[0]) for s in samples]
        p = min(starts)
        prompt = samples[0].input_ids[:p]
        if any(not torch.equal(s.input_ids[:p], prompt) for s in samples):
            raise ValueError(f"question {question.get('id')}: the options' prompts differ; the chat "
                             "template must put the question before the answer")
        ends = [int((s.labels != IGNORE_INDEX).nonzero()[-1]) + 1 for s in samples]
        width = max(ends) - p
        rest = torch.zeros(len(samples), width, dtype=prompt.dtype)
        trained = torch.zeros(len(samples), width, dtype=torch.bool)
        for i, (s, end) in enumerate(zip(samples, ends)):
            rest[i, :end - p] = s.input_ids[p:end]
            trained[i, :end - p] = s.labels[p:end] != IGNORE_INDEX
        return Prepared(prompt, samples[0].pixel_values, rest, trained)

    def _score_batch(self, prepared: list["Prepared"]) -> list[list[float]]:
        """Prompts of one length, side by side; then all their options (right-padded to the widest)."""
        prompts = torch.stack([p.prompt for p in prepared])
        pixels = torch.cat([p.pixels for p in prepared])
        width = max(p.rest.shape[1] for p in prepared)
        rest = torch.cat([torch.nn.functional.pad(p.rest, (0, width - p.rest.shape[1])) for p in prepared])
        trained = torch.cat([torch.nn.functional.pad(p.trained, (0, width - p.rest.shape[1])) for p in prepared])
        owner = torch.cat([torch.full((len(p.rest),), i, dtype=torch.long) for i, p in enumerate(prepared)])
        was_training = self.model.training
        self.model.eval()
        try:
            cache = self.model.new_kv_cache(prompts.shape[1] + width, batch=len(prepared))
            last = self.model(prompts, pixel_values=pixels, kv_cache=cache).logits[:, -1:].float()
            logits = self.model(rest, kv_cache=cache.rows(owner)).logits[:, :-1].float()
            logits = torch.cat([last.index_select(0, owner), logits], dim=1)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, rest[..., None]).squeeze(-1)
            flat = (logp * trained).sum(dim=1)
        finally:
            self.model.train(was_training)
        return [[float(x) for x in flat[owner == i]] for i in range(len(prepared))]

    @torch.no_grad()
    def __call__(self, question: dict, image: bytes) -> list[float]:
        """The prompt (everything before the first trained token, shared by all options) runs once
        into a KV cache; the options then run side by side as one batch continuing that cache,
        right-padded to the longest (causal attention: padding after an option cannot change it)."""
        return self._score_batch([self._prepare(question, image)])[0]


def heldout_accuracy(model, builder, questions_path: str | Path, limit: int | None = None) -> AccuracyResult:
    """The demo's final number: option-likelihood accuracy of `model` on the held-out questions."""
    questions = load_questions(questions_path)[:limit]
    return evaluate(questions, ModelOptionScorer(model, builder))


def final_stage_dir(run_dir: Path) -> Path:
    """The last finished stage of a run (stages/<i>_<name>/ with DONE, highest i)."""
    from evip.stage_weights import DONE
    from evip.inference import stage_dirs

    done = [d for d in stage_dirs(Path(run_dir)) if (d / DONE).is_file()]
    if not done:
        raise FileNotFoundError(f"{run_dir}/stages has no finished stage (no DONE file): run "
                                "`evip run` to the end of a stage first")
    return done[-1]


def run_accuracy(run_dir: str | Path, questions_path: str | Path, limit: int | None = None) -> AccuracyResult:
    """Held-out accuracy of a run's latest finished stage; also written to RUN_DIR/accuracy.json.

    The model is rebuilt from the stage's consolidated weights, the tokenizer is the run's, and
    samples are built with that stage's `data.sample` settings (chat template, system prompt,
    tiles) without its filters: the same run-directory readers as `evip generate` (evip/inference.py).
    """
    from evip.data.filters import FilterConfig
    from evip.data.sample import SampleBuilder
    from evip.inference import latest_weights, run_tokenizer, stage_sample_config

    run_dir = Path(run_dir)
    stage_dir = final_stage_dir(run_dir)
    weights = latest_weights(run_dir, stage=stage_dir.name)
    tokenizer = run_tokenizer(run_dir)
    sample_cfg = stage_sample_config(weights)
    if sample_cfg is None:
        raise FileNotFoundError(f"{stage_dir / 'stage.yaml'} not found: the stage's sample settings are needed")
    sample_cfg = dataclasses.replace(sample_cfg, filters=FilterConfig())
    model, model_cfg = weights.build(), weights.model_cfg
    result = heldout_accuracy(model, SampleBuilder(sample_cfg, tokenizer, model_cfg), questions_path, limit)
    out = result.to_dict() | {"stage": stage_dir.name, "questions": str(questions_path),
                              "method": "option log-likelihood (sum over answer tokens + <|im_end|>)"}
    (run_dir / "accuracy.json").write_text(json.dumps(out, indent=1))
    return result
