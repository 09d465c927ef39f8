"""Texts for each EViP stage, written from a scene's facts (evip/demo/scenes.py).

- S1.1 concept learning: noisy web alt-text (partial, shuffled, typos, irrelevant tags).
- S1.2 semantic learning: exact dense captions.
- S1.3 alignment learning: task samples as single-turn chats: grounding in InternVL's
  `<ref>..</ref><box>[[x1, y1, x2, y2]]</box>` form (0-1000 coordinates), counting, OCR.
- S2 instruction tuning: multi-turn LLaVA-format conversations.
- Held-out multiple-choice questions for the final accuracy (evip/demo/accuracy.py).

Every function takes a `random.Random` so that a seed fixes the text as well as the picture
(`text_rng`: a stream of its own, not the one that drew the scene).
"""
from __future__ import annotations

import dataclasses
import random

from evip.demo.scenes import COLOURS, SHAPES, SLOTS, WORDS, Scene, SceneObject, box_to_1000

IMAGE = "<image>"
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
JUNK_TAGS = ("stock photo", "free download", "vector clipart", "hd wallpaper", "royalty free",
             "illustration", "icon set", "png", "cartoon", "abstract background", "design element",
             "flat style", "kids", "simple")
SHORT_ANSWER = "Answer with a single word."
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
         "bottom": "at the bottom", "centre": "in the centre"}


def text_rng(scene_seed: int) -> random.Random:
    """The random stream for a scene's texts. Not `Random(scene_seed)`: that replays the draws that
    made the scene, so the text choices would follow its layout (e.g. the question kind would
    follow the number of shapes)."""
    return random.Random(f"text:{scene_seed}")


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word
    i = rng.randrange(len(word) - 1)
    op = rng.randrange(3)
    if op == 0:                                 # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:                                 # drop a letter
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]         # double a letter


@dataclasses.dataclass(frozen=True)
class AltTextNoise:
    """How noisy web alt-text is: each object kept with `keep`, named with its colour with
    `colour`, each word misspelt with `typo`; the words shuffled with `shuffle`; all upper case
    with `upper`; 0 to `max_tags` junk tags and a file name with `file_name`, as on the web. `phrases`: an object's
    words stay together ("red circle"); otherwise each word is its own item between separators."""
    keep: float = 0.75
    colour: float = 0.8
    typo: float = 0.15
    shuffle: float = 0.5
    upper: float = 0.1
    phrases: bool = False
    max_tags: int = 3
    file_name: float = 0.3


WEB_NOISE = AltTextNoise()
# S1.1's simple pictures: the alt-text of a picture of one object mostly names it (as an image
# search result's does), still with typos, junk tags, file names and capitals.
CONCEPT_NOISE = AltTextNoise(keep=1.0, colour=1.0, typo=0.05, shuffle=0.0, upper=0.05, phrases=True, max_tags=1,
                             file_name=0.1)


def noisy_alt_text(scene: Scene, rng: random.Random, noise: AltTextNoise = WEB_NOISE) -> str:
    """S1.1: web alt-text: some of the objects, words shuffled, typos, junk tags, no grammar.
    Unshuffled, the objects are named in reading order (left to right, top to bottom)."""
    kept = [o for o in scene.objects if rng.random() < noise.keep] or [rng.choice(scene.objects)]
    kept.sort(key=lambda o: (o.center[0], o.center[1]))
    items = [[o.colour, o.shape] if rng.random() < noise.colour else [o.shape] for o in kept]
    if scene.word is not None and rng.random() < 0.6:
        items.append([f'"{scene.word.text}"' if rng.random() < 0.5 else scene.word.text])
    items = [[_typo(w, rng) if rng.random() < noise.typo else w for w in item] for item in items]
    words = [" ".join(item) for item in items] if noise.phrases else [w for item in items for w in item]
    if rng.random() < noise.shuffle:
        rng.shuffle(words)
    tags = rng.sample(JUNK_TAGS, rng.randint(0, noise.max_tags))
    parts = words + tags
    if rng.random() < noise.file_name:
        parts.append(f"img_{rng.randrange(10000):04d}")
    sep = rng.choice([" ", ", ", " - ", " | "])
    text = sep.join(parts)
    return text.upper() if rng.random() < noise.upper else text


def _object_phrase(o: SceneObject) -> str:
    return f"a {o.name} {WHERE[o.position]}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def dense_caption(scene: Scene) -> str:
    """S1.2: an exact caption stating every object, its colour and place, the count and the word."""
    n = len(scene.objects)
    text = f"The image shows {NUMBER_WORDS[n]} {_plural('shape', n)}: "
    text += _join([_object_phrase(o) for o in scene.objects]) + "."
    if scene.word is not None:
        text += f' The word "{scene.word.text}" is written in black {WHERE[scene.word.position]}.'
    return text


def grounding_answer(o: SceneObject, size: int) -> str:
    x1, y1, x2, y2 = box_to_1000(o.box, size)
    return f"<ref>{o.name}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>"


def task_sample(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """S1.3: one (task, question, answer): grounding, counting or OCR (OCR only with a word)."""
    tasks = ["grounding", "counting", "counting"] + (["ocr", "ocr"] if scene.word else [])
    task = rng.choice(tasks)
    if task == "grounding":
        o = rng.choice(scene.objects)
        q = ("Please provide the bounding box coordinate of the region this sentence describes: "
             f"<ref>{o.name}</ref>")
        return task, q, grounding_answer(o, scene.size)
    if task == "ocr":
        return task, "What word is written in the image?", scene.word.text
    shape = rng.choice([None, *SHAPES])
    if shape is None:
        return task, "How many shapes are there in the image?", str(len(scene.objects))
    return task, f"How many {shape}s are there in the image?", str(scene.count(shape=shape))


def _chat_turn(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A free-form turn: a description, a colour, a place, a count, text or presence, in sentences."""
    o = rng.choice(scene.objects)
    kind = rng.randrange(6)
    if kind == 0:
        return "Describe the image.", dense_caption(scene)
    if kind == 1:
        return f"What colour is the {o.shape} {WHERE[o.position]}?", f"It is {o.colour}."
    if kind == 2:
        return f"Where is the {o.name}?", f"The {o.name} is {WHERE[o.position]}."
    if kind == 3:
        n = len(scene.objects)
        return "How many shapes can you see?", f"I can see {NUMBER_WORDS[n]} {_plural('shape', n)}."
    if kind == 4 and scene.word is not None:
        return "Is there any text in the image?", f'Yes, the word "{scene.word.text}".'
    if kind == 4:
        return "Is there any text in the image?", "No, there is no text in the image."
    return f"Is there a {o.shape} in the image?", f"Yes, there is a {o.name} {WHERE[o.position]}."


def conversation(pairs) -> list[dict]:
    """LLaVA-format turns from (question, answer) pairs: a repeated question is dropped, and the
    first human turn carries the `<image>` placeholder."""
    turns, asked = [], set()
    for q, a in pairs:
        if q not in asked:
            asked.add(q)
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    turns[0]["value"] = f"{IMAGE}\n{turns[0]['value']}"
    return turns


def chat(scene: Scene, rng: random.Random, max_turns: int = 4) -> list[dict]:
    """S2: a LLaVA-format conversation of 2 to max_turns turns about one image.

    As in LLaVA-665k, most turns are short answers ("Answer with a single word.") and some are
    free-form sentences; one image serves every turn, so a chat teaches several facts per image."""
    def turn() -> tuple[str, str]:
        if rng.random() < 0.7:
            short = short_question(scene, rng)
            return short["question"], short["options"][short["answer"]]
        return _chat_turn(scene, rng)
    return conversation(turn() for _ in range(rng.randint(2, max_turns)))


def short_question(scene: Scene, rng: random.Random) -> dict:
    """A short-answer question (LLaVA-style "Answer with a single word."), its options and the
    index of the right one: what S2 chats practise and what the held-out accuracy asks."""
    o = rng.choice(scene.objects)
    kind = rng.choice(["colour", "position", "count"] + (["word"] if scene.word else []))
    if kind == "colour":
        q, answer, options = (f"What colour is the {o.shape} {WHERE[o.position]}?", o.colour,
                              list(COLOURS))
    elif kind == "position":
        q, answer, options = f"Where is the {o.name}?", o.position, list(SLOTS)
    elif kind == "count":
        q, answer = "How many shapes are there in the image?", str(len(scene.objects))
        options = ["1", "2", "3", "4"]
    else:
        distractors = rng.sample([w for w in WORDS if w != scene.word.text], 3)
        options = sorted([scene.word.text, *distractors])
        q, answer = "What word is written in the image?", scene.word.text
    return {"kind": kind, "question": f"{q}\n{SHORT_ANSWER}", "options": options,
            "answer": options.index(answer)}


def caption_probes(scene: Scene, rng: random.Random) -> list[dict]:
    """Two held-out probes that need no chat training (S1 ends here): one object's colour among
    all colours and its shape among all shapes, each option the scene's exact dense caption with
    that one attribute changed. The option the model finds likeliest is its answer: what a
    caption-trained model sees, measured by likelihood."""
    i = rng.randrange(len(scene.objects))

    def caption_with(**change) -> str:
        objects = list(scene.objects)
        objects[i] = dataclasses.replace(objects[i], **change)
        return dense_caption(dataclasses.replace(scene, objects=objects))

    o = scene.objects[i]
    return [{"kind": kind, "form": "caption", "object": o.name,
             "options": [caption_with(**{attr: v}) for v in values], "answer": values.index(getattr(o, attr))}
            for kind, attr, values in (("colour", "colour", list(COLOURS)), ("shape", "shape", list(SHAPES)))]


def heldout_question(scene: Scene, rng: random.Random) -> dict:
    """A held-out multiple-choice question (same form as the short answers S2 trains on)."""
    return short_question(scene, rng)
