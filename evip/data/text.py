"""Text: templates and label masks, built as a list of segments so the labels are exact.

A template turns a record into segments: (token ids or text, trains?, image index or None).
Text pieces are tokenised in one batched call with `split_special_tokens=True`, so a caption
that happens to contain "<IMG_CONTEXT>" or "<|im_end|>" cannot forge an image or a turn end.
Special markers are inserted as ids, never as text; only the grounding tokens (<ref>, </ref>,
<box>, </box>, <quad>, </quad>) written in the text become their special ids (task data). Image blocks are

    <img> + <IMG_CONTEXT> * (tokens_per_tile * n_tiles) + </img> + "\\n"

Templates (per kind):
- caption / "caption": image blocks, then the caption + eos; loss on caption and eos only.
- chat / "internlm2-chat" (ChatML, SmolLM2 and InternLM2 use the same markers):
      <|im_start|>system\\n{system}<|im_end|>\\n
      <|im_start|>user\\n{human, <image> -> image block}<|im_end|>\\n
      <|im_start|>assistant\\n{answer}<|im_end|>\\n
  loss on each assistant answer and its <|im_end|> only. `<image>` (and one newline after it)
  in human turns becomes the next image block; with images but no `<image>` in the text, all
  blocks are prepended to the first human turn (LLaVA convention).
- text / "text": the document + eos, loss on every token.

Truncation (`assemble`): trailing tokens beyond max_length are cut, but never inside or
before the end of an image block: if an image block would not fit, the sample is dropped with
BadSample('too_long'). A sample left without any trained token raises BadSample('no_labels').
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from evip.batch import IGNORE_INDEX
from evip.data.record import BadSample
from evip.model.tokens import GROUNDING_TOKENS, IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

# template name -> the record kind it formats ("chat" is an alias of "internlm2-chat")
TEMPLATES = {"caption": "caption", "chat": "chat", "internlm2-chat": "chat", "text": "text"}
DEFAULT_TEMPLATE = {"caption": "caption", "chat": "internlm2-chat", "text": "text"}
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IMAGE_PLACEHOLDER = re.compile(r"<image>\n?")
GROUNDING_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in GROUNDING_TOKENS) + ")")


def check_template(kind: str, template: str) -> str:
    """The canonical template for records of `kind` ('' -> the kind's default); ValueError
    naming both when the kind is unknown or the template does not format that kind."""
    if kind not in DEFAULT_TEMPLATE:
        raise ValueError(f"unknown kind {kind!r}: one of {sorted(DEFAULT_TEMPLATE)}")
    if not template:
        return DEFAULT_TEMPLATE[kind]
    if TEMPLATES.get(template) != kind:
        valid = [t for t, k in TEMPLATES.items() if k == kind]
        raise ValueError(f"template {template!r} cannot format kind {kind!r}: use one of {valid}")
    return DEFAULT_TEMPLATE[kind]


@dataclass
class Segment:
    text: str | None = None          # tokenised later (batched)
    ids: list[int] | None = None     # already ids (special markers, image blocks)
    train: bool = False
    image: int | None = None         # index of the image this block stands for


class TokenIds:
    """The ids a template needs, looked up once from the tokenizer."""

    def __init__(self, tokenizer, tokens_per_tile: int):
        self.tok = tokenizer
        self.tokens_per_tile = int(tokens_per_tile)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the image tokens {missing}: load it with "
                             "evip.model.tokens.load_tokenizer (adds them)")
        self.img_start, self.img_end, self.img_context = (vocab[t] for t in (IMG_START, IMG_END, IMG_CONTEXT))
        self.im_start, self.im_end = vocab.get(IM_START), vocab.get(IM_END)
        self.grounding = {t: vocab[t] for t in GROUNDING_TOKENS if t in vocab}
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise ValueError("tokenizer has no eos_token: captions and documents need one")
        self.newline = self.encode(["\n"])[0]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Batched tokenisation; only the grounding tokens (<ref>, <box>, ...) stay special."""
        if not texts:
            return []
        pieces = [GROUNDING_SPLIT.split(t) if self.grounding else [t] for t in texts]
        flat = [p for ps in pieces for p in ps if p and p not in self.grounding]
        enc = iter(self.tok(flat, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if flat else iter(())
        out = []
        for ps in pieces:
            ids: list[int] = []
            for p in ps:
                if p in self.grounding:
                    ids.append(self.grounding[p])
                elif p:
                    ids += next(enc)
            out.append(ids)
        return out

    def image_block(self, n_tiles: int) -> list[int]:
        return [self.img_start] + [self.img_context] * (self.tokens_per_tile * n_tiles) + [self.img_end] + self.newline


def caption_segments(ids: TokenIds, caption: str, n_tiles: list[int]) -> list[Segment]:
    segs = [Segment(ids=ids.image_block(n), image=i) for i, n in enumerate(n_tiles)]
    return segs + [Segment(text=caption, train=True), Segment(ids=[ids.eos], train=True)]


def text_segments(ids: TokenIds, text: str) -> list[Segment]:
    return [Segment(text=text, train=True), Segment(ids=[ids.eos], train=True)]


def _human_segments(ids: TokenIds, value: str, n_tiles: list[int], next_image: int) -> tuple[list[Segment], int]:
    segs, pos = [], 0
    for m in IMAGE_PLACEHOLDER.finditer(value):
        if next_image >= len(n_tiles):
            raise BadSample("image_mismatch", f"more <image> placeholders than the {len(n_tiles)} images")
        if m.start() > pos:
            segs.append(Segment(text=value[pos:m.start()]))
        segs.append(Segment(ids=ids.image_block(n_tiles[next_image]), image=next_image))
        next_image, pos = next_image + 1, m.end()
    if pos < len(value):
        segs.append(Segment(text=value[pos:]))
    return segs, next_image


def chat_segments(ids: TokenIds, conversations: list[dict], n_tiles: list[int],
                  system_prompt: str = "") -> list[Segment]:
    if ids.im_start is None or ids.im_end is None:
        raise ValueError(f"tokenizer lacks {IM_START}/{IM_END}: the internlm2-chat template needs them")
    turns = []
    for t in conversations:
        role = ROLES.get(str(t.get("from", t.get("role", ""))))
        value = t.get("value", t.get("content"))
        if role is None or not isinstance(value, str):
            raise BadSample("bad_conversation", f"turn {t!r}: need from in {sorted(ROLES)} and a string value")
        turns.append((role, value))
    if not any(r == "assistant" for r, _ in turns):
        raise BadSample("no_labels", "conversation has no assistant turn")
    if system_prompt and turns[0][0] != "system":
        turns.insert(0, ("system", system_prompt))
    prepend = bool(n_tiles) and not any(r == "user" and IMAGE_PLACEHOLDER.search(v) for r, v in turns)
    segs, next_image = [], 0
    for role, value in turns:
        segs.append(Segment(ids=[ids.im_start]))
        segs.append(Segment(text=f"{role}\n"))
        if role == "user":
            if prepend:
                segs += [Segment(ids=ids.image_block(n), image=i) for i, n in enumerate(n_tiles)]
                prepend, next_image = False, len(n_tiles)
            body, next_image = _human_segments(ids, value, n_tiles, next_image)
            segs += body
        elif value:
            segs.append(Segment(text=value, train=role == "assistant"))
        segs.append(Segment(ids=[ids.im_end], train=role == "assistant"))
        segs.append(Segment(ids=ids.newline))
    if next_image != len(n_tiles):
        raise BadSample("image_mismatch", f"{len(n_tiles)} images but {next_image} used by <image> "
                                          "placeholders in human turns")
    return segs


def assemble(ids: TokenIds, segs: list[Segment], max_length: int) -> tuple[list[int], list[int]]:
    """Segments -> (input_ids, labels) with the truncation rule of the module doc."""
    texts = [s.text for s in segs if s.ids is None]
    encoded = iter(ids.encode(texts))
    input_ids: list[int] = []
    labels: list[int] = []
    last_image_end = 0
    for s in segs:
        piece = s.ids if s.ids is not None else next(encoded)
        input_ids += piece
        labels += piece if s.train else [IGNORE_INDEX] * len(piece)
        if s.image is not None:
            last_image_end = len(input_ids)
    if len(input_ids) > max_length:
        if last_image_end > max_length:
            raise BadSample("too_long", f"image blocks end at token {last_image_end} > max_length="
                                        f"{max_length}: lower image.max_tiles or raise max_length")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSample("no_labels", "no token left to train on (after truncation)")
    return input_ids, labels
