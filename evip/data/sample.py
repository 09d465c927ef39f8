"""One raw Record -> one tokenised Sample (or BadSample), cheapest checks first.

    build = SampleBuilder(SampleConfig(max_length=4096), tokenizer, model_cfg)
    sample = build(record)          # raises BadSample(reason) for anything unusable

Order: required fields -> duplicate key -> caption length (chars) -> each image's header
(bomb guard, min side, aspect ratio, exact duplicate) -> tile grids -> tokens and labels
(caption token length, truncation) -> only then decode and tile the pixels (uint8 RGB tiles;
the model normalises them on its device). So a
sample that will be dropped is dropped before its pixels are decoded.

Multi-image samples split the tile budget as InternVL does: each image's grid is chosen among
those of min_tiles .. max(1, max_tiles // n_images) tiles, and when min_tiles is above that cap
there is none and the image gets one tile (`image.split_tiles_across_images`).
The filter state (bounded dedup tables) is `builder.state_dict()`; the stream checkpoints it.
The duplicate checks are replay-safe (re-building the same record is not a duplicate), so
re-reading the packer's pending samples after a restore needs no special care.

One builder per recipe source (its template and filters are per source):

    SampleBuilder(SampleConfig(max_length=..., template=src.template,
                               image=ImageConfig(min_tiles=..., max_tiles=..., ...),
                               filters=FilterConfig.from_dict(src.filters, f"sources.{i}.filters")),
                  tokenizer, model_cfg)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from evip.batch import KIND_ID
from evip.data.filters import FilterConfig, Filters
from evip.data.images import ImageConfig, ImageProcessor, open_header, per_image_max_tiles
from evip.data.record import BadSample, Record, Sample
from evip.data.text import (TEMPLATES, TokenIds, assemble, caption_segments, chat_segments,
                            check_template, text_segments)


@dataclass
class SampleConfig:
    max_length: int = 4096            # tokens per sample, images included (<= the packer's budget)
    template: str = ""                # '' -> the kind's default (caption | internlm2-chat | text)
    system_prompt: str = ""           # chat: a system turn added when the conversation has none
    image: ImageConfig = field(default_factory=ImageConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self):
        if self.max_length <= 0:
            raise ValueError(f"max_length={self.max_length}: must be positive")


class SampleBuilder:
    """Callable Record -> Sample; see the module docstring."""

    def __init__(self, cfg: SampleConfig, tokenizer, model_cfg):
        self.cfg = cfg
        self.ids = TokenIds(tokenizer, model_cfg.tokens_per_tile)
        if self.ids.img_context != model_cfg.img_context_token_id:
            raise ValueError(f"tokenizer's <IMG_CONTEXT> id is {self.ids.img_context} but "
                             f"model.img_context_token_id={model_cfg.img_context_token_id}: set the "
                             "model config from the tokenizer")
        self.images = ImageProcessor(cfg.image, tile_size=model_cfg.image_size)
        self.filters = Filters(cfg.filters)
        self.tile_size = model_cfg.image_size
        if cfg.template and cfg.template not in TEMPLATES:   # fail here, not inside a worker
            raise ValueError(f"template={cfg.template!r} is unknown: one of {list(TEMPLATES)}")

    # -- the pipeline --------------------------------------------------------------------
    def __call__(self, rec: Record) -> Sample:
        template = check_template(rec.kind, self.cfg.template)
        self._check_fields(rec)
        self.filters.check_record(rec)
        if rec.kind == "caption":
            self.filters.check_caption(rec.text)
        grids = self._plan_images(rec)
        n_tiles = [self.images.n_tiles(g) for g in grids]
        if template == "caption":
            segs = caption_segments(self.ids, rec.text.strip(), n_tiles)
        elif template == "internlm2-chat":
            segs = chat_segments(self.ids, rec.conversations, n_tiles, self.cfg.system_prompt)
        else:
            segs = text_segments(self.ids, rec.text)
        input_ids, labels = assemble(self.ids, segs, self.cfg.max_length)
        if rec.kind == "caption" and (self.cfg.filters.min_caption_tokens or self.cfg.filters.max_caption_tokens):
            self.filters.check_caption_tokens(sum(1 for x in labels if x >= 0) - 1)   # minus eos
        pixels = self._pixels(rec, grids)
        return Sample(input_ids=torch.tensor(input_ids, dtype=torch.long),
                      labels=torch.tensor(labels, dtype=torch.long), kind_id=KIND_ID[rec.kind],
                      pixel_values=pixels, key=rec.key, source=rec.source)

    def _check_fields(self, rec: Record) -> None:
        if rec.kind in ("caption", "text") and not (isinstance(rec.text, str) and rec.text.strip()):
            raise BadSample("missing_field", f"{rec.kind} record {rec.key!r} in {rec.shard} has no text")
        if rec.kind == "caption" and not rec.images:
            raise BadSample("missing_field", f"caption record {rec.key!r} in {rec.shard} has no image")
        if rec.kind == "chat" and not rec.conversations:
            raise BadSample("missing_field", f"chat record {rec.key!r} in {rec.shard} has no conversations")
        if rec.kind == "text" and rec.images:
            raise BadSample("bad_record", f"text-only record {rec.key!r} in {rec.shard} carries images")

    def _plan_images(self, rec: Record) -> list[tuple[int, int]]:
        n = len(rec.images)
        c = self.cfg.image
        per_image = per_image_max_tiles(c.max_tiles, n, c.split_tiles_across_images)
        grids = []
        for i, data in enumerate(rec.images):
            w, h = open_header(data, c.bomb_pixels).size
            self.filters.check_image(rec, i, data, w, h)
            grids.append(self.images.grid(w, h, per_image))
        return grids

    def _pixels(self, rec: Record, grids: list[tuple[int, int]]) -> torch.Tensor:
        if not grids:
            return torch.zeros((0, 3, self.tile_size, self.tile_size), dtype=torch.uint8)
        tiles = [self.images.render(data, grid) for data, grid in zip(rec.images, grids)]
        return tiles[0] if len(tiles) == 1 else torch.cat(tiles)     # one image: no extra copy

    # -- state (bounded dedup tables) ----------------------------------------------------
    def state_dict(self) -> dict:
        return {"filters": self.filters.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.filters.load_state_dict(state["filters"])
