"""The deterministic, resumable, elastic record stream of one (rank, worker) slot.

Order (all seeded by (seed, source index, epoch[, shard]) alone, never by time or pid):
- per source and epoch, a permutation of its shards; shard position q of that order is cut into
  `nparts` parts (nparts = ceil(slots / shards) when there are fewer shards than slots, else 1),
  giving units u = q * nparts + part; slot s of S reads units s, s + S, s + 2S, ... So every
  slot has data (no uneven-rank hang) and slots never overlap.
- a slot reads its units in groups of `interleave_shards` (its lanes), the group's lanes taking
  turns record by record: consecutive records come from different shards (a cross-shard
  shuffle with no buffer to save). A lane that ends leaves the turns to the others.
- within a shard, a seeded permutation of its member indices (random-access shards with
  `shuffle_within_shard`; `pipe:` shards keep file order); part p reads positions p, p+nparts, ...
- sources are interleaved by `Mixture` (a counter-based weighted draw).
- each source cycles epochs on its own, with a fresh order: the stream never ends.

State (small, JSON-able, O(1) to restore: the reader seeks straight to the position):
    {"mixture": {"n"}, "sources": [{"epoch", "group", "offsets", "done", "layers"}]}
`group` indexes this slot's groups of units; per lane, `offsets` counts the positions of its
unit already passed and `done` says it has ended (so a resumed run never counts an end twice).

Elastic resume: `elastic_state(all_slot_states, new_slot, new_num_slots)` keeps the old slots'
cursors as a *layer*: a position (epoch, shard, j) is consumed iff the old slot that owned it had
passed it. On loading, a slot keeps only the cursors of the old slots that own its own positions
(about as many as it has shards), so its state stays a few hundred bytes, not one cursor per old
slot; the copies held by different slots merge back at the next change (`merge_layers`). The new slot starts at the oldest epoch any old slot was in and skips consumed
positions with an O(1) test each (whole consumed shards without opening them). Nothing consumed
is repeated and nothing is lost, in-progress shards included; the mixture draws differ from the
old run's (proportions hold). A layer is dropped once this slot has passed its last epoch.
A changed `interleave_shards` is a new layout too.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import tarfile

import numpy as np

from evip.data.mixture import Mixture
from evip.data.record import BadSample

log = logging.getLogger(__name__)


def num_parts(n_shards: int, num_slots: int) -> int:
    return math.ceil(num_slots / n_shards) if n_shards < num_slots else 1


@functools.lru_cache(maxsize=16)
def shard_order(seed: int, src: int, epoch: int, n: int) -> np.ndarray:
    """The epoch's shard permutation (read-only; memoised: 10 ms for 100,000 shards, and every
    cursor of a process, e.g. a scale simulation, shares it)."""
    order = np.random.default_rng([seed, src, epoch, 0]).permutation(n)
    order.flags.writeable = False
    return order


def member_order(seed: int, src: int, epoch: int, shard: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, src, epoch, 1, shard]).permutation(n)


class _Layer:
    """Positions consumed under an earlier layout (slot count, lanes per slot): the cursors of
    the old slots, all of them (a list) or, once a new slot has kept only those owning its own
    positions (`pruned`), a dict {old slot: cursor}. `id` names the layout's snapshot, so the
    pruned copies of one layer held by different slots merge back (`merge_layers`)."""

    def __init__(self, num_slots: int, lanes: int, cursors: list[list] | dict[int, list], id: str = ""):
        self.num_slots, self.lanes, self.id = num_slots, lanes, id
        self.cursors = cursors                        # per old slot: [epoch, group, offsets, done]
        values = cursors.values() if isinstance(cursors, dict) else cursors
        self.max_epoch = max((c[0] for c in values), default=-1)

    def pruned(self, n_shards: int, positions) -> _Layer:
        """This layer with only the cursors of the old slots that own a part of one of the shard
        positions `positions` (all a new slot can ask about): a few instead of every old slot."""
        npart = num_parts(n_shards, self.num_slots)
        owners = {(q * npart + p) % self.num_slots for q in positions for p in range(npart)}
        get = self.cursors.get if isinstance(self.cursors, dict) else self.cursors.__getitem__
        kept = {s: get(s) for s in sorted(owners)}
        return _Layer(self.num_slots, self.lanes, {s: c for s, c in kept.items() if c is not None}, self.id)

    def _passed(self, epoch: int, unit: int, offset: int | None) -> bool:
        """Whether the old slot owning `unit` had passed position `offset` of it (None: all of it)."""
        s, k = unit % self.num_slots, unit // self.num_slots
        if isinstance(self.cursors, dict) and s not in self.cursors:
            # a pruned copy lacks an owner only when the slot holding it had passed this layer's
            # epochs, and then the newer layer already answered "consumed"
            return False
        e, group, offsets, done = self.cursors[s]
        if e != epoch:
            return e > epoch
        g, lane = divmod(k, self.lanes)
        return g < group or (g == group and (done[lane] or (offset is not None and offset < offsets[lane])))

    def consumed(self, epoch: int, q: int, j: int, n_shards: int) -> bool:
        npart = num_parts(n_shards, self.num_slots)
        return self._passed(epoch, q * npart + j % npart, j // npart)

    def shard_done(self, epoch: int, q: int, n_shards: int) -> bool:
        npart = num_parts(n_shards, self.num_slots)
        return all(self._passed(epoch, q * npart + p, None) for p in range(npart))

    def to_state(self) -> dict:
        if isinstance(self.cursors, dict):            # JSON keys are strings
            return {"num_slots": self.num_slots, "lanes": self.lanes, "id": self.id,
                    "cursors": {str(k): c for k, c in self.cursors.items()}}
        return {"num_slots": self.num_slots, "lanes": self.lanes, "id": self.id, "cursors": self.cursors}

    @classmethod
    def from_state(cls, st: dict) -> _Layer:
        c = st["cursors"]
        cursors = {int(k): list(v) for k, v in c.items()} if isinstance(c, dict) else [list(v) for v in c]
        return cls(st["num_slots"], st["lanes"], cursors, st.get("id", ""))


def merge_layers(states: list[dict]) -> list[dict]:
    """The layers held by several slots, one per layout snapshot: pruned copies of the same layer
    (same `id`) merged into one {old slot: cursor} map; layers without an id (older states)
    deduplicated by equality."""
    merged: dict[str, dict] = {}
    legacy: list[dict] = []
    for st in states:
        if not st.get("id"):
            if st not in legacy:
                legacy.append(st)
            continue
        into = merged.setdefault(st["id"], {**st, "cursors": {}})
        c = st["cursors"]
        into["cursors"].update(c if isinstance(c, dict) else {str(k): v for k, v in enumerate(c)})
    return [*merged.values(), *legacy]


def fresh_source_state(lanes: int) -> dict:
    """A source cursor's state before its first record."""
    return {"epoch": 0, "group": 0, "offsets": [0] * lanes, "done": [False] * lanes, "layers": []}


def lanes_of(stream_state: dict) -> list[int]:
    """Lanes per source (`interleave_shards`) a slot-stream state was taken with."""
    return [len(src["offsets"]) for src in stream_state["sources"]]


class SourceCursor:
    """Where one slot is in one source: the epoch, the group of `lanes` units it reads
    interleaved, and per lane the positions passed and whether the lane has ended."""

    def __init__(self, source, src_index: int, seed: int, slot: int, num_slots: int):
        self.source, self.src, self.seed = source, src_index, seed
        self.slot, self.num_slots = slot, num_slots
        self.n_shards = len(source.shards)
        self.nparts = num_parts(self.n_shards, num_slots)
        self.lanes = source.cfg.interleave_shards
        self.epoch, self.group = 0, 0
        self.offsets, self.done = [0] * self.lanes, [False] * self.lanes
        self.layers: list[_Layer] = []
        self._readers: dict[int, tuple] = {}  # lane -> (shard, reader, member order or None)
        self._last_shard = -1
        self._epoch_positions = 0
        self._order = (-1, None)

    # ---- layout --------------------------------------------------------------------------
    def _units(self) -> range:
        return range(self.slot, self.n_shards * self.nparts, self.num_slots)

    def _shard_order(self) -> np.ndarray:
        if self._order[0] != self.epoch:
            self._order = (self.epoch, shard_order(self.seed, self.src, self.epoch, self.n_shards))
        return self._order[1]

    def _open(self, lane: int, shard: int):
        if lane in self._readers:
            return self._readers[lane][1:]
        reader = self.source.open(shard)
        order = None
        if reader.random_access and self.source.cfg.shuffle_within_shard:
            order = member_order(self.seed, self.src, self.epoch, shard, len(reader))
        self._readers[lane] = (shard, reader, order)
        return reader, order

    def _close(self, lane: int) -> None:
        r = self._readers.pop(lane, None)
        if r is not None:
            r[1].close()

    def _consumed(self, q: int, j: int) -> bool:
        return any(l.consumed(self.epoch, q, j, self.n_shards) for l in self.layers)

    def _next_group(self, units: range) -> None:
        for lane in list(self._readers):
            self._close(lane)
        self.group += 1
        self.offsets, self.done = [0] * self.lanes, [False] * self.lanes
        if self.group * self.lanes >= len(units):
            self._next_epoch()

    def _next_epoch(self) -> None:
        if self._epoch_positions == 0 and not self.layers:
            raise RuntimeError(
                f"source {self.source.cfg.name!r}: slot {self.slot} of {self.num_slots} (ranks x workers) "
                f"found no sample in a whole epoch; the source has too few samples for this many "
                f"ranks x workers, or all its shards are empty")
        self.epoch, self.group, self._epoch_positions = self.epoch + 1, 0, 0
        self.layers = [l for l in self.layers if l.max_epoch >= self.epoch]

    # ---- reading -------------------------------------------------------------------------
    def next(self):
        """The next Record, or a BadSample (to count) for a position that failed to read.
        The lanes of the current group take turns (the lane with the fewest positions passed,
        then the lowest index), so consecutive records come from different shards."""
        while True:
            units = self._units()
            if not units:
                self._next_epoch()
                continue
            first = self.group * self.lanes
            open_lanes = [i for i in range(self.lanes) if not self.done[i] and first + i < len(units)]
            if not open_lanes:
                self._next_group(units)
                continue
            lane = min(open_lanes, key=lambda i: (self.offsets[i], i))
            item = self._step(lane, units[first + lane])
            if item is not None:
                return item

    def _step(self, lane: int, u: int):
        """One position of `lane` (unit `u`): a Record or BadSample, or None (nothing to hand
        out: the position was consumed before an elastic resume, or the lane just ended)."""
        q, part = divmod(u, self.nparts)
        if self.offsets[lane] == 0 and self.layers and any(
                l.shard_done(self.epoch, q, self.n_shards) for l in self.layers):
            return self._end(lane)
        shard = int(self._shard_order()[q])
        self._last_shard = shard
        try:
            reader, order = self._open(lane, shard)
        except (OSError, tarfile.TarError) as e:       # gone, unreadable, a pipe that fails
            self._epoch_positions += 1
            return self._end(lane, BadSample("unreadable_shard", f"{self.source.shards[shard]}: {e}")
                             if part == 0 else None)
        j = part + self.offsets[lane] * self.nparts
        if reader.random_access and j >= len(reader):
            return self._end(lane, self._truncation(reader, part))
        self.offsets[lane] += 1
        if self.layers and self._consumed(q, j):
            return None
        self._epoch_positions += 1
        try:
            return reader.get(int(order[j]) if order is not None else j)
        except IndexError:                # a pipe shard ended
            self.offsets[lane] -= 1
            self._epoch_positions -= 1
            return self._end(lane, self._truncation(reader, part))
        except BadSample as e:
            return e

    def _end(self, lane: int, item=None):
        """Mark `lane` ended (in the state: a resumed run does not count its end again)."""
        self.done[lane] = True
        self._close(lane)
        return item

    def _truncation(self, reader, part: int) -> BadSample | None:
        """The one BadSample a truncated shard counts (by its part 0), else None."""
        if reader.truncated and part == 0:
            self._epoch_positions += 1
            return BadSample("truncated", f"{reader.path if hasattr(reader, 'path') else ''}: "
                                          f"{reader.truncated}")
        return None

    @property
    def current_shard(self) -> str:
        return "" if self._last_shard < 0 else self.source.shards[self._last_shard]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "group": self.group, "offsets": list(self.offsets),
                "done": list(self.done), "layers": [l.to_state() for l in self.layers]}

    def load_state_dict(self, st: dict) -> None:
        if len(st["offsets"]) != self.lanes:
            raise ValueError(
                f"source {self.source.cfg.name!r}: the state was taken with interleave_shards="
                f"{len(st['offsets'])}, the recipe now says {self.lanes}; resume through "
                "elastic_state (EvipLoader.load_state_dict does) or set it back in the recipe")
        for lane in list(self._readers):
            self._close(lane)
        self.epoch, self.group = int(st["epoch"]), int(st["group"])
        self.offsets, self.done = [int(o) for o in st["offsets"]], [bool(d) for d in st["done"]]
        # keep only the old cursors owning this slot's positions: the state stays small
        mine = {u // self.nparts for u in self._units()}
        self.layers = [_Layer.from_state(l).pruned(self.n_shards, mine) for l in st["layers"]]
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


def elastic_state(old: list[dict], slot: int, num_slots: int, lanes: list[int] | None = None) -> dict:
    """The state for `slot` of a new layout of `num_slots` slots reading `lanes` shards at once
    per source (default: as before), from the states of ALL old slots."""
    return elastic_states(old, [slot], num_slots, lanes)[slot]


def elastic_states(old: list[dict], slots, num_slots: int, lanes: list[int] | None = None) -> dict[int, dict]:
    """`elastic_state` for several new slots at once (the old cursors are gathered once; the
    states share their layers)."""
    old = sorted(old, key=lambda s: s["slot"])
    n_old = old[0]["num_slots"]
    if [s["slot"] for s in old] != list(range(n_old)):
        raise ValueError(f"elastic resume needs the state of every old slot 0..{n_old - 1}, "
                         f"got slots {[s['slot'] for s in old]}")
    lanes = lanes or lanes_of(old[0])
    per_source = []
    for i in range(len(old[0]["sources"])):
        per_slot = [s["sources"][i] for s in old]
        cursors = [[p["epoch"], p["group"], list(p["offsets"]), list(p["done"])] for p in per_slot]
        snapshot = hashlib.blake2b(json.dumps([n_old, cursors]).encode(), digest_size=8).hexdigest()
        layers = [_Layer(n_old, len(per_slot[0]["offsets"]), cursors, snapshot).to_state()]
        # earlier layouts still relevant to some old slot (each holds the part it needed)
        layers += merge_layers([l for p in per_slot for l in p["layers"]])
        start = min(p["epoch"] for p in per_slot)
        per_source.append((start, layers))
        log.info("elastic resume of source %d: %d slots x %d lanes -> %d x %d; restarting epoch %d in the "
                 "new layout and skipping every position the old slots had consumed (epochs %d..%d)",
                 i, n_old, len(per_slot[0]["offsets"]), num_slots, lanes[i], start, start,
                 max(p["epoch"] for p in per_slot))
    return {slot: {"slot": slot, "num_slots": num_slots, "mixture": {"n": 0},
                   "sources": [{**fresh_source_state(lanes[i]), "epoch": start, "layers": layers}
                               for i, (start, layers) in enumerate(per_source)]}
            for slot in slots}
