"""The data stream at cluster scale, computed in this one process (no process started): shard
assignment and elastic resume for 1,024 ranks x 8 workers over 100,000 shards.

    .venv/bin/python bench/data_scale.py [--ranks 1024] [--workers 8] [--shards 100000] [--new-ranks 768]

What runs is evip's own stream code (evip/data/stream.py: SourceCursor, elastic_states) over an
in-memory source of `--shards` shards of 1-3 samples each (seeded sizes; a sample is its
(shard, member) pair), one cursor per (rank, worker) slot, each read exactly as a worker reads
it. What it reports (last line: one JSON object):
- epoch: every sample read exactly once in one epoch by the R x W slots; the spread of work
  (samples and shards per slot: min, max, max/mean);
- state: the bytes of one worker's stream state (JSON) in the normal case, and after an elastic
  resume: handed to the worker (every old slot's cursor) and as the worker keeps and checkpoints
  it (the old cursors owning its own positions, until the epoch in progress ends);
- elastic: the R x W slots read a seeded random part of the epoch, their states go to a layout
  of `--new-ranks` x W slots, which read the rest: every sample exactly once across the change
  (none repeated, none lost, in-progress shards included); the time to build the new states
  (all slots, as one rank does for its own: the old cursors gathered once) and the restore time
  per worker (load the state, reach the first unread sample), mean and max over 64 workers.
Times are this process's CPU time (`time.process_time`): other jobs on the machine do not skew them.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np

from evip.data.recipe import SourceConfig
from evip.data.stream import SourceCursor, elastic_states, fresh_source_state


class MemoryShard:
    random_access, truncated = True, None

    def __init__(self, shard: int, n: int):
        self.shard, self.n = shard, n

    def __len__(self) -> int:
        return self.n

    def get(self, j: int) -> tuple[int, int]:
        return self.shard, j

    def close(self) -> None:
        pass


class MemorySource:
    """`n_shards` shards of 1-3 samples (seeded): what SourceCursor needs of a source."""

    def __init__(self, n_shards: int, seed: int = 0, lanes: int = 4):
        self.cfg = SourceConfig(name="web", interleave_shards=lanes, shuffle_within_shard=False)
        self.shards = [f"{i:06d}.tar" for i in range(n_shards)]
        self.sizes = np.random.default_rng(seed).integers(1, 4, n_shards)

    def open(self, i: int) -> MemoryShard:
        return MemoryShard(i, int(self.sizes[i]))

    @property
    def total(self) -> int:
        return int(self.sizes.sum())


def read_epoch(cursor: SourceCursor, limit: int | None = None, epoch: int = 0) -> list[tuple[int, int]]:
    """The samples `cursor` reads of epoch `epoch` (at most `limit`); it stops at the next epoch's
    first sample, which it has then taken (not counted: the caller reads no further)."""
    out = []
    if cursor.epoch != epoch:
        return out
    while limit is None or len(out) < limit:
        rec = cursor.next()
        if cursor.epoch != epoch:
            break
        out.append(rec)
    return out


def state_bytes(cursor: SourceCursor, slot: int, num_slots: int) -> int:
    st = {"slot": slot, "num_slots": num_slots, "mixture": {"n": 0}, "sources": [cursor.state_dict()]}
    return len(json.dumps(st))


def spread(counts: list[int]) -> dict:
    return {"min": int(min(counts)), "max": int(max(counts)), "mean": float(np.mean(counts)),
            "max_over_mean": float(max(counts) / np.mean(counts))}


def run(ranks: int, workers: int, shards: int, new_ranks: int, seed: int = 0) -> dict:
    src = MemorySource(shards, seed)
    slots, new_slots = ranks * workers, new_ranks * workers
    everything = Counter((i, j) for i in range(shards) for j in range(int(src.sizes[i])))
    out: dict = {"ranks": ranks, "workers": workers, "shards": shards, "samples": src.total,
                 "new_ranks": new_ranks}

    # 1. one epoch under R x W slots: every sample once; the spread of work
    t = time.process_time()
    seen: Counter = Counter()
    per_slot, shards_per_slot = [], []
    for s in range(slots):
        c = SourceCursor(src, 0, seed, s, slots)
        got = read_epoch(c)
        seen.update(got)
        per_slot.append(len(got))
        shards_per_slot.append(len(c._units()))
    out["epoch"] = {"every_sample_once": seen == everything, "samples_per_slot": spread(per_slot),
                    "shards_per_slot": spread(shards_per_slot), "seconds": time.process_time() - t}
    out["state_bytes_per_worker"] = state_bytes(SourceCursor(src, 0, seed, 0, slots), 0, slots)

    # 2. part of the epoch under R x W, the rest under R' x W
    rng = np.random.default_rng(seed + 1)
    consumed: Counter = Counter()
    old_states = []
    for s in range(slots):
        c = SourceCursor(src, 0, seed, s, slots)
        consumed.update(read_epoch(c, int(rng.integers(0, per_slot[s] + 1))))
        old_states.append({"slot": s, "num_slots": slots, "mixture": {"n": 0}, "sources": [c.state_dict()]})
    t = time.process_time()
    new_states = elastic_states(old_states, range(new_slots), new_slots)
    build_s = time.process_time() - t
    rest: Counter = Counter()
    restore, after = [], []
    for s in range(new_slots):
        c = SourceCursor(src, 0, seed, s, new_slots)
        t = time.process_time()
        c.load_state_dict(new_states[s]["sources"][0])
        got = read_epoch(c, 1)
        if s < 64:
            restore.append(time.process_time() - t)
        if s == 0:
            loaded_bytes = state_bytes(c, s, new_slots)     # what its next checkpoint saves
        got += read_epoch(c)
        rest.update(got)
        after.append(len(got))
    both = consumed + rest
    out["elastic"] = {
        "every_sample_once": both == everything, "read_before": sum(consumed.values()),
        "read_after": sum(rest.values()), "repeated": sum(n - 1 for n in both.values() if n > 1),
        "lost": sum(1 for k in everything if k not in both),
        "build_states_seconds": build_s, "restore_seconds_mean": float(np.mean(restore)),
        "restore_seconds_max": float(max(restore)), "samples_per_new_slot": spread(after),
        "state_bytes_handed_to_worker": len(json.dumps(new_states[0])),
        "state_bytes_per_worker_after": loaded_bytes,
        "fresh_state_bytes": len(json.dumps(fresh_source_state(4)))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--new-ranks", type=int, default=768)
    args = ap.parse_args()
    t = time.process_time()
    out = run(args.ranks, args.workers, args.shards, args.new_ranks)
    out["total_seconds"] = time.process_time() - t
    e, x = out["epoch"], out["elastic"]
    print(f"{args.ranks} x {args.workers} slots over {args.shards:,} shards ({out['samples']:,} samples): every sample "
          f"once per epoch: {e['every_sample_once']}; samples per slot {e['samples_per_slot']['min']}-"
          f"{e['samples_per_slot']['max']} (max/mean {e['samples_per_slot']['max_over_mean']:.2f}), shards per slot "
          f"{e['shards_per_slot']['min']}-{e['shards_per_slot']['max']}; state {out['state_bytes_per_worker']} B/worker")
    print(f"{args.ranks} -> {args.new_ranks} ranks mid-epoch: every sample once: {x['every_sample_once']} "
          f"(repeated {x['repeated']}, lost {x['lost']}); new states built in {x['build_states_seconds']:.2f} s; "
          f"restore {1e3 * x['restore_seconds_mean']:.2f} ms/worker (max {1e3 * x['restore_seconds_max']:.2f}); "
          f"state after the change {x['state_bytes_per_worker_after']:,} B/worker (handed over: "
          f"{x['state_bytes_handed_to_worker']:,} B)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
