"""What a source yields and what a sample becomes: the contract between the stream
(shards, sources, mixture, loader) and the sample processing (images, text, packing)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Record:
    """One raw sample as read from a source, before decoding."""
    key: str                       # unique within its source (tar member stem, jsonl line id, row index)
    source: str                    # recipe name of the source
    shard: str                     # shard / file it came from (for error messages)
    kind: str                      # caption | chat | text
    images: list[bytes] = field(default_factory=list)     # encoded image files, in prompt order
    text: str | None = None                               # caption (kind caption) or document (kind text)
    conversations: list[dict] | None = None               # [{"from": "system"|"human"|"gpt", "value": str}]
    meta: dict = field(default_factory=dict)              # the img2dataset json, jsonl extras, ...


class BadSample(Exception):
    """A sample that must be skipped; `reason` is a short counter name (decode, bomb,
    missing_field, truncated, min_side, aspect_ratio, caption_length, duplicate, too_long...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Sample:
    """One tokenised sample, ready to pack (see evip/batch.py for the packed form)."""
    input_ids: torch.Tensor        # LongTensor [L]
    labels: torch.Tensor           # LongTensor [L], -100 where no loss
    kind_id: int                   # evip.batch.KIND_ID
    pixel_values: torch.Tensor     # uint8 [n_tiles, 3, S, S] RGB tiles, normalised by the model (n_tiles may be 0)
    key: str = ""
    source: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.numel())
