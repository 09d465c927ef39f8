"""Packing: whole samples into fixed-size micro-batches (the dict of evip/batch.py).

    packer = Packer(token_budget=4096, max_images_per_pack=24, pad_id=0, rows=2)
    for pos, sample in stream:
        for batch in packer.add(sample, position=pos):
            yield batch

Rule (deterministic, strictly in arrival order): a micro-batch has `rows` rows of
`token_budget` tokens. A sample goes to the first row of the open micro-batch where it fits
(tokens) and the micro-batch's tile cap is not exceeded; when it fits nowhere, the open
micro-batch is emitted and the sample opens the next one. Samples are never split or reordered
across micro-batches, so the pending samples are always a contiguous run of the sample stream:
exactly those added since the last emitted micro-batch.

Resumable state (small, positions only): `state_dict()` holds the caller's `position` of every
pending sample (in order) plus the counters; it never holds tensors. To restore, load the
state, rewind the stream to `resume_from()` (the position of the oldest pending sample, taken
before its record was read) and feed the samples again: the packer then rebuilds the very same
micro-batch. A sample longer than the budget, or with more tiles than the cap, is refused with
BadSample before it touches the state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from evip.batch import IGNORE_INDEX
from evip.data.record import BadSample, Sample


@dataclass
class PackStats:
    batches: int = 0
    samples: int = 0
    real_tokens: int = 0
    budget_tokens: int = 0
    tiles: int = 0

    @property
    def efficiency(self) -> float:
        """Real (non-pad) tokens / tokens of the emitted micro-batches."""
        return self.real_tokens / self.budget_tokens if self.budget_tokens else 0.0


@dataclass
class _Row:
    samples: list[Sample] = field(default_factory=list)
    tokens: int = 0


class Packer:
    """Fill micro-batches of `rows` x `token_budget` tokens with whole samples.

    `max_images_per_pack` caps the image *tiles* (pixel_values rows) per micro-batch, as
    InternVL's packed dataset counts them: it bounds the vision memory of a step. 0: no cap.
    """

    def __init__(self, token_budget: int, max_images_per_pack: int, pad_id: int, rows: int = 1):
        if token_budget <= 0 or rows <= 0 or max_images_per_pack < 0:
            raise ValueError(f"Packer(token_budget={token_budget}, rows={rows}, "
                             f"max_images_per_pack={max_images_per_pack}): budget and rows must be "
                             "positive and the tile cap non-negative")
        self.token_budget = int(token_budget)
        self.max_tiles = int(max_images_per_pack)
        self.pad_id = int(pad_id)
        self.rows = int(rows)
        self.stats = PackStats()
        self._open: list[_Row] = [_Row() for _ in range(self.rows)]
        self._positions: list[Any] = []
        self._tiles = 0

    # -- filling -------------------------------------------------------------------------
    def check(self, sample: Sample) -> None:
        """Raise BadSample if this sample can never be packed (call before consuming it)."""
        if len(sample) == 0:
            raise BadSample("empty", f"sample {sample.key!r} has no tokens")
        if len(sample) > self.token_budget:
            raise BadSample("too_long", f"sample {sample.key!r} has {len(sample)} tokens > "
                                        f"token budget {self.token_budget}")
        n = int(sample.pixel_values.shape[0])
        if self.max_tiles and n > self.max_tiles:
            raise BadSample("too_many_images", f"sample {sample.key!r} has {n} tiles > "
                                               f"max_images_per_pack={self.max_tiles}")

    def _place(self, sample: Sample) -> bool:
        n = int(sample.pixel_values.shape[0])
        if self.max_tiles and self._tiles + n > self.max_tiles:
            return False
        for row in self._open:
            if row.tokens + len(sample) <= self.token_budget:
                row.samples.append(sample)
                row.tokens += len(sample)
                self._tiles += n
                return True
        return False

    def add(self, sample: Sample, position: Any = None) -> list[dict[str, torch.Tensor]]:
        """Add one sample; return the micro-batches it completed (0 or 1). `position` is any
        small picklable value that lets the caller re-read this sample (see the module doc)."""
        self.check(sample)
        out = []
        if not self._place(sample):
            out.append(self._emit())
            placed = self._place(sample)
            assert placed, "a checked sample always fits an empty micro-batch"
        self._positions.append(position)
        return out

    def flush(self) -> list[dict[str, torch.Tensor]]:
        """Emit the open micro-batch if it holds anything (end of a finite stream)."""
        return [self._emit()] if self._positions else []

    # -- state ---------------------------------------------------------------------------
    def pending(self) -> int:
        """Number of samples waiting in the open micro-batch."""
        return len(self._positions)

    def resume_from(self) -> Any:
        """Position of the oldest pending sample (None when nothing is pending)."""
        return self._positions[0] if self._positions else None

    def state_dict(self) -> dict:
        return {"pending_positions": list(self._positions), "stats": vars(self.stats).copy(),
                "token_budget": self.token_budget, "rows": self.rows, "max_tiles": self.max_tiles}

    def load_state_dict(self, state: dict) -> list[Any]:
        """Restore the counters and empty the open micro-batch; return the positions of the
        samples the caller must feed again (in order) before continuing the stream."""
        for k in ("token_budget", "rows", "max_tiles"):
            if state[k] != getattr(self, k):
                raise ValueError(f"packer state was saved with {k}={state[k]}, this packer has "
                                 f"{getattr(self, k)}: restore with the same packing config")
        self.stats = PackStats(**state["stats"])
        self._open = [_Row() for _ in range(self.rows)]
        self._positions, self._tiles = [], 0
        return list(state["pending_positions"])

    # -- the batch dict ------------------------------------------------------------------
    def _emit(self) -> dict[str, torch.Tensor]:
        B, T = self.rows, self.token_budget
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        seq_ids = torch.full((B, T), -1, dtype=torch.long)
        kind_ids = torch.full((B, T), -1, dtype=torch.long)
        pixels, real, n_samples = [], 0, 0
        for b, row in enumerate(self._open):
            t = 0
            for s_idx, s in enumerate(row.samples):
                n = len(s)
                input_ids[b, t:t + n] = s.input_ids
                labels[b, t:t + n] = s.labels
                labels[b, t] = IGNORE_INDEX   # a sample's first token has no target inside it
                position_ids[b, t:t + n] = torch.arange(n)
                seq_ids[b, t:t + n] = s_idx
                kind_ids[b, t:t + n] = s.kind_id
                if s.pixel_values.shape[0]:
                    pixels.append(s.pixel_values)
                t += n
            real += t
            n_samples += len(row.samples)
        if len({p.dtype for p in pixels}) > 1:   # torch.cat would promote uint8 to float: wrong values
            raise ValueError(f"samples in one micro-batch carry pixel_values of dtypes "
                             f"{sorted(str(p.dtype) for p in pixels)}: every source must ship uint8 RGB "
                             "tiles (ImageProcessor) or every one normalised floats, not a mix")
        if pixels:
            pixel_values = torch.cat(pixels)
        else:
            size, dtype = self._empty_pixels()
            pixel_values = torch.zeros((0, 3, size, size), dtype=dtype)
        self.stats.batches += 1
        self.stats.samples += n_samples
        self.stats.real_tokens += real
        self.stats.budget_tokens += B * T
        self.stats.tiles += int(pixel_values.shape[0])
        self._open = [_Row() for _ in range(self.rows)]
        self._positions, self._tiles = [], 0
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "seq_ids": seq_ids, "kind_ids": kind_ids, "pixel_values": pixel_values}

    def _empty_pixels(self) -> tuple[int, torch.dtype]:
        """(tile size, dtype) of a micro-batch without tiles: the samples' own (uint8 if none)."""
        for row in self._open:
            for s in row.samples:
                return int(s.pixel_values.shape[-1]), s.pixel_values.dtype
        return 0, torch.uint8
