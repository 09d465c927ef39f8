"""The deterministic, resumable, elastic record stream of one (rank, worker) slot.

Order (all seeded by (seed, source index, epoch[, shard]) alone, never by time or pid):
- per source and epoch, a permutation of its shards; shard position q of that order is cut into
  `nparts` parts (nparts = ceil(slots / shards) when there are fewer shards than slots, else 1),
  giving units u = q * nparts + part; slot s of S reads units s, s + S, s + 2S, ... in order.
  So every slot has data (no uneven-rank hang) and slots never overlap.
- within a shard, a seeded permutation of its member indices (random-access shards with
  `shuffle_within_shard`; `pipe:` shards keep file order); part p reads positions p, p+nparts, ...
- sources are interleaved by `Mixture` (a counter-based weighted draw).
- each source cycles epochs on its own, with a fresh order: the stream never ends.

State (small, JSON-able, O(1) to restore: the reader seeks straight to the position):
    {"mixture": {"n"}, "sources": [{"epoch", "unit", "offset", "layers"}]}
`unit` indexes this slot's unit list, `offset` counts positions of the unit already passed.

Elastic resume: `elastic_state(all_slot_states, new_slot, new_num_slots)` keeps the old slots'
cursors as a *layer*: a position (epoch, shard, j) is consumed iff the old slot that owned it had
passed it. The new slot starts at the oldest epoch any old slot was in and skips consumed
positions with an O(1) test each (whole consumed shards without opening them). Nothing consumed
is repeated and nothing is lost, in-progress shards included; the mixture draws differ from the
old run's (proportions hold). A layer is dropped once this slot has passed its last epoch.
"""
from __future__ import annotations

import logging
import math
import tarfile

import numpy as np

from evip.data.mixture import Mixture
from evip.data.record import BadSample

log = logging.getLogger(__name__)


def num_parts(n_shards: int, num_slots: int) -> int:
    return math.ceil(num_slots / n_shards) if n_shards < num_slots else 1


def shard_order(seed: int, src: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, src, epoch, 0]).permutation(n)


def member_order(seed: int, src: int, epoch: int, shard: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, src, epoch, 1, shard]).permutation(n)


class _Layer:
    """Positions consumed under an earlier (slot-count) layout."""

    def __init__(self, num_slots: int, cursors: list[list[int]]):
        self.num_slots = num_slots
        self.cursors = cursors                        # per old slot: [epoch, unit, offset]
        self.max_epoch = max(c[0] for c in cursors)

    def _passed(self, epoch: int, unit: int, offset: int | None, n_shards: int) -> bool:
        s, k = unit % self.num_slots, unit // self.num_slots
        e, ck, co = self.cursors[s]
        if e != epoch:
            return e > epoch
        return k < ck or (offset is not None and k == ck and offset < co)

    def consumed(self, epoch: int, q: int, j: int, n_shards: int) -> bool:
        npart = num_parts(n_shards, self.num_slots)
        return self._passed(epoch, q * npart + j % npart, j // npart, n_shards)

    def shard_done(self, epoch: int, q: int, n_shards: int) -> bool:
        npart = num_parts(n_shards, self.num_slots)
        return all(self._passed(epoch, q * npart + p, None, n_shards) for p in range(npart))

    def to_state(self) -> dict:
        return {"num_slots": self.num_slots, "cursors": self.cursors}


class SourceCursor:
    """Where one slot is in one source."""

    def __init__(self, source, src_index: int, seed: int, slot: int, num_slots: int):
        self.source, self.src, self.seed = source, src_index, seed
        self.slot, self.num_slots = slot, num_slots
        self.n_shards = len(source.shards)
        self.nparts = num_parts(self.n_shards, num_slots)
        self.epoch, self.unit, self.offset = 0, 0, 0
        self.layers: list[_Layer] = []
        self._reader = None                   # (epoch, shard, reader, member order or None)
        self._epoch_positions = 0
        self._order = (-1, None)

    # ---- layout --------------------------------------------------------------------------
    def _units(self) -> range:
        return range(self.slot, self.n_shards * self.nparts, self.num_slots)

    def _shard_order(self) -> np.ndarray:
        if self._order[0] != self.epoch:
            self._order = (self.epoch, shard_order(self.seed, self.src, self.epoch, self.n_shards))
        return self._order[1]

    def _open(self, shard: int):
        r = self._reader
        if r is not None and r[:2] == (self.epoch, shard):
            return r[2], r[3]
        if r is not None:
            r[2].close()
        reader = self.source.open(shard)
        order = None
        if reader.random_access and self.source.cfg.shuffle_within_shard:
            order = member_order(self.seed, self.src, self.epoch, shard, len(reader))
        self._reader = (self.epoch, shard, reader, order)
        return reader, order

    def _consumed(self, q: int, j: int) -> bool:
        return any(l.consumed(self.epoch, q, j, self.n_shards) for l in self.layers)

    def _next_epoch(self) -> None:
        if self._epoch_positions == 0 and not self.layers:
            raise RuntimeError(
                f"source {self.source.cfg.name!r}: slot {self.slot} of {self.num_slots} (ranks x workers) "
                f"found no sample in a whole epoch; the source has too few samples for this many "
                f"ranks x workers, or all its shards are empty")
        self.epoch, self.unit, self.offset, self._epoch_positions = self.epoch + 1, 0, 0, 0
        self.layers = [l for l in self.layers if l.max_epoch >= self.epoch]

    # ---- reading -------------------------------------------------------------------------
    def next(self):
        """The next Record, or a BadSample (to count) for a position that failed to read."""
        while True:
            units = self._units()
            if self.unit >= len(units):
                self._next_epoch()
                continue
            u = units[self.unit]
            q, part = divmod(u, self.nparts)
            if self.offset == 0 and self.layers and any(
                    l.shard_done(self.epoch, q, self.n_shards) for l in self.layers):
                self.unit += 1
                continue
            shard = int(self._shard_order()[q])
            try:
                reader, order = self._open(shard)
            except (OSError, tarfile.TarError) as e:   # gone, unreadable, a pipe that fails
                self.unit, self.offset = self.unit + 1, 0
                self._epoch_positions += 1
                if part == 0:
                    return BadSample("unreadable_shard", f"{self.source.shards[shard]}: {e}")
                continue
            j = part + self.offset * self.nparts
            if reader.random_access and j >= len(reader):
                item = self._end_unit(reader, part)
                if item is not None:
                    return item
                continue
            self.offset += 1
            if self.layers and self._consumed(q, j):
                continue
            self._epoch_positions += 1
            try:
                return reader.get(int(order[j]) if order is not None else j)
            except IndexError:                # a pipe shard ended
                self.offset -= 1
                self._epoch_positions -= 1
                item = self._end_unit(reader, part)
                if item is not None:
                    return item
            except BadSample as e:
                return e

    def _end_unit(self, reader, part: int):
        self.unit, self.offset = self.unit + 1, 0
        if reader.truncated and part == 0:
            self._epoch_positions += 1
            return BadSample("truncated", f"{reader.path if hasattr(reader, 'path') else ''}: "
                                          f"{reader.truncated}")
        return None

    @property
    def current_shard(self) -> str:
        return "" if self._reader is None else self.source.shards[self._reader[1]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "offset": self.offset,
                "layers": [l.to_state() for l in self.layers]}

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.unit, self.offset = int(st["epoch"]), int(st["unit"]), int(st["offset"])
        self.layers = [_Layer(l["num_slots"], [list(c) for c in l["cursors"]]) for l in st["layers"]]
        self._epoch_positions = 1             # resumed mid-epoch: positions were read before


class SlotStream:
    """All sources of a recipe, mixed, for one slot."""

    def __init__(self, sources: list, weights: list[float], seed: int, slot: int, num_slots: int):
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} out of range for {num_slots} slots")
        self.sources = sources
        self.slot, self.num_slots = slot, num_slots
        self.cursors = [SourceCursor(s, i, seed, slot, num_slots) for i, s in enumerate(sources)]
        self.mixture = Mixture(weights, seed, stream_id=slot)

    def next(self) -> tuple[int, object]:
        """(source index, Record or BadSample)."""
        i = self.mixture.next()
        return i, self.cursors[i].next()

    def state_dict(self) -> dict:
        return {"slot": self.slot, "num_slots": self.num_slots, "mixture": self.mixture.state_dict(),
                "sources": [c.state_dict() for c in self.cursors]}

    def load_state_dict(self, st: dict) -> None:
        if (st["slot"], st["num_slots"]) != (self.slot, self.num_slots):
            raise ValueError(f"state of slot {st['slot']}/{st['num_slots']} given to slot "
                             f"{self.slot}/{self.num_slots}: use elastic_state() to change the layout")
        self.mixture.load_state_dict(st["mixture"])
        for c, s in zip(self.cursors, st["sources"]):
            c.load_state_dict(s)


def elastic_state(old: list[dict], slot: int, num_slots: int) -> dict:
    """The state for `slot` of a new layout of `num_slots`, from the states of ALL old slots."""
    old = sorted(old, key=lambda s: s["slot"])
    n_old = old[0]["num_slots"]
    if [s["slot"] for s in old] != list(range(n_old)):
        raise ValueError(f"elastic resume needs the state of every old slot 0..{n_old - 1}, "
                         f"got slots {[s['slot'] for s in old]}")
    sources = []
    for i in range(len(old[0]["sources"])):
        per_slot = [s["sources"][i] for s in old]
        layers = [_Layer(n_old, [[p["epoch"], p["unit"], p["offset"]] for p in per_slot]).to_state()]
        for p in per_slot:                    # earlier layouts still relevant to some old slot
            for l in p["layers"]:
                if l not in layers:
                    layers.append(l)
        start = min(p["epoch"] for p in per_slot)
        sources.append({"epoch": start, "unit": 0, "offset": 0, "layers": layers})
        if slot == 0:
            log.info("elastic resume of source %d: %d -> %d slots; restarting epoch %d in the new layout "
                     "and skipping every position the old slots had consumed (epochs %d..%d)",
                     i, n_old, num_slots, start, start, max(p["epoch"] for p in per_slot))
    return {"slot": slot, "num_slots": num_slots, "mixture": {"n": 0}, "sources": sources}
