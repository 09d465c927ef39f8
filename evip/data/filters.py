"""Noisy-data hygiene: cheap checks that run before an image is decoded.

Each check raises BadSample(reason) and keeps no counters (the stream counts per source and
reason). Reasons: min_side, aspect_ratio, caption_length, duplicate_key, duplicate_image.

Duplicates are found with a bounded, direct-mapped table (`SeenTable`): `capacity` slots of
(fingerprint, owner) uint64 pairs, 16 bytes a slot, a newer entry evicting an older one in the
same slot (so memory is fixed and a duplicate may be missed after eviction, never invented,
up to 64-bit hash collisions). The owner is the identity of the record that was seen first
(source, shard, key): meeting the *same* record again (a replay after restore, the next epoch)
is not a duplicate, so the check is idempotent and replay-safe. `state_dict()` is two int64
tensors, for the stream's checkpoint.
Image duplicates are exact duplicates of the encoded bytes (blake2b-64 of the file).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from evip.data.record import BadSample, Record


# the reasons a filter gives (the others a loader counts are bad data: decode, bomb, missing_field...)
FILTER_REASONS = ("min_side", "aspect_ratio", "caption_length", "duplicate_key", "duplicate_image")


@dataclass
class FilterConfig:
    min_side: int = 0                 # px; 0: off. Shorter image side below this: dropped
    max_aspect_ratio: float = 0.0     # long side / short side above this: dropped; 0: off
    min_caption_chars: int = 0        # caption kind only; 0: off
    max_caption_chars: int = 0        # 0: off
    min_caption_tokens: int = 0       # caption kind, counted with the model tokenizer; 0: off
    max_caption_tokens: int = 0       # 0: off
    dedup_keys: bool = False          # drop a (source, key) met again in another shard
    dedup_images: bool = False        # drop byte-identical images met in another record
    dedup_capacity: int = 1 << 16     # slots per table (16 bytes each)

    @classmethod
    def from_dict(cls, d: dict, where: str = "filters") -> "FilterConfig":
        """From a recipe's `filters:` mapping; ValueError naming an unknown key and `where`."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown filter {unknown[0]!r} in {where}: one of {sorted(known)}")
        return cls(**dict(d))

    def __post_init__(self):
        if self.max_aspect_ratio and self.max_aspect_ratio < 1:
            raise ValueError(f"filters.max_aspect_ratio={self.max_aspect_ratio}: must be >= 1 (or 0 for off)")
        if self.dedup_capacity <= 0:
            raise ValueError(f"filters.dedup_capacity={self.dedup_capacity}: must be positive")


def fingerprint(*parts: str | bytes) -> int:
    """A non-zero 63-bit blake2b fingerprint of the parts (stable across processes and runs)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return (int.from_bytes(h.digest(), "little") >> 1) | 1


class SeenTable:
    """Fixed-size 'have I met this fingerprint under another owner?' table (see module doc)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.keys = np.zeros(self.capacity, dtype=np.int64)
        self.owners = np.zeros(self.capacity, dtype=np.int64)

    def seen_elsewhere(self, fp: int, owner: int) -> bool:
        """True if `fp` was recorded by a different owner; else record (fp, owner)."""
        slot = fp % self.capacity
        if self.keys[slot] == fp and self.owners[slot] != owner:
            return True
        self.keys[slot], self.owners[slot] = fp, owner
        return False

    def state_dict(self) -> dict:
        return {"keys": torch.from_numpy(self.keys.copy()), "owners": torch.from_numpy(self.owners.copy())}

    def load_state_dict(self, state: dict) -> None:
        keys, owners = state["keys"].numpy(), state["owners"].numpy()
        if keys.shape != (self.capacity,):
            raise ValueError(f"dedup state has {keys.shape[0]} slots, filters.dedup_capacity="
                             f"{self.capacity}: restore with the same capacity")
        self.keys[:], self.owners[:] = keys, owners


class Filters:
    """The hygiene checks of one source (or one sample builder)."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.keys = SeenTable(cfg.dedup_capacity) if cfg.dedup_keys else None
        self.images = SeenTable(cfg.dedup_capacity) if cfg.dedup_images else None

    def check_record(self, rec: Record) -> None:
        """Duplicate key check (before anything is decoded)."""
        if self.keys is not None:
            owner = fingerprint(rec.source, rec.shard, rec.key)
            if self.keys.seen_elsewhere(fingerprint(rec.source, rec.key), owner):
                raise BadSample("duplicate_key", f"key {rec.key!r} of source {rec.source!r} met "
                                                 f"again in shard {rec.shard}")

    def check_caption(self, text: str) -> None:
        n, c = len(text), self.cfg
        if (c.min_caption_chars and n < c.min_caption_chars) or (c.max_caption_chars and n > c.max_caption_chars):
            raise BadSample("caption_length", f"{n} chars outside filters.min/max_caption_chars="
                                              f"[{c.min_caption_chars}, {c.max_caption_chars or 'inf'}]")

    def check_caption_tokens(self, n: int) -> None:
        c = self.cfg
        if (c.min_caption_tokens and n < c.min_caption_tokens) or (c.max_caption_tokens and n > c.max_caption_tokens):
            raise BadSample("caption_length", f"{n} tokens outside filters.min/max_caption_tokens="
                                              f"[{c.min_caption_tokens}, {c.max_caption_tokens or 'inf'}]")

    def check_image(self, rec: Record, index: int, data: bytes, width: int, height: int) -> None:
        """Size checks from the header, then the exact-duplicate check on the bytes."""
        c = self.cfg
        if c.min_side and min(width, height) < c.min_side:
            raise BadSample("min_side", f"image {index} is {width}x{height} < filters.min_side={c.min_side}")
        if c.max_aspect_ratio and max(width, height) / min(width, height) > c.max_aspect_ratio:
            raise BadSample("aspect_ratio", f"image {index} is {width}x{height}, aspect > "
                                            f"filters.max_aspect_ratio={c.max_aspect_ratio}")
        if self.images is not None:
            owner = fingerprint(rec.source, rec.shard, rec.key, str(index))
            if self.images.seen_elsewhere(fingerprint(data), owner):
                raise BadSample("duplicate_image", f"image {index} of {rec.key!r} is a byte-identical "
                                                   "copy of an image already seen")

    def state_dict(self) -> dict:
        return {name: t.state_dict() for name, t in (("keys", self.keys), ("images", self.images)) if t is not None}

    def load_state_dict(self, state: dict) -> None:
        for name, table in (("keys", self.keys), ("images", self.images)):
            if table is not None and name in state:
                table.load_state_dict(state[name])
