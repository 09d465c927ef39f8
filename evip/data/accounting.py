"""Counting samples and bad samples per source and reason, and stopping past a bad fraction.

Counters live in each DataLoader worker, are part of its saved state, and travel to the main
process with every batch (see loader.py `EvipLoader.stats()`).
"""
from __future__ import annotations

from collections import Counter


class TooManyBadSamples(RuntimeError):
    """The bad fraction of a source passed `max_bad_fraction`."""


class Accounting:
    MAX_SHARDS_KEPT = 32                      # per source: the shards with most bad samples

    def __init__(self, source_names: list[str], max_bad_fraction: float, min_samples: int):
        self.names = list(source_names)
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples = int(min_samples)
        self.good = {n: 0 for n in self.names}
        self.bad = {n: Counter() for n in self.names}
        self.bad_shards = {n: Counter() for n in self.names}
        self.packed_tokens = 0                # real (non-pad) tokens emitted
        self.budget_tokens = 0                # rows x token budget of the batches emitted
        self.batches = 0

    def ok(self, source: str) -> None:
        self.good[source] += 1

    def add_bad(self, source: str, shard: str, reason: str) -> None:
        self.bad[source][reason] += 1
        shards = self.bad_shards[source]
        shards[shard] += 1
        if len(shards) > 2 * self.MAX_SHARDS_KEPT:
            self.bad_shards[source] = Counter(dict(shards.most_common(self.MAX_SHARDS_KEPT)))
        self.check(source, shard)

    def check(self, source: str, shard: str) -> None:
        nbad = sum(self.bad[source].values())
        total = nbad + self.good[source]
        if total < self.min_samples or nbad <= self.max_bad_fraction * total:
            return
        reasons = ", ".join(f"{r} x{c}" for r, c in self.bad[source].most_common(3))
        worst = ", ".join(f"{s} ({c})" for s, c in self.bad_shards[source].most_common(3))
        raise TooManyBadSamples(
            f"source {source!r}: {nbad} of {total} samples are bad ({nbad / total:.1%} > "
            f"max_bad_fraction {self.max_bad_fraction:.1%}); last bad shard {shard}; "
            f"top reasons: {reasons}; worst shards: {worst}. Fix or drop the shards, or raise "
            f"data.max_bad_fraction")

    def packed(self, real_tokens: int, budget_tokens: int) -> None:
        self.packed_tokens += int(real_tokens)
        self.budget_tokens += int(budget_tokens)
        self.batches += 1

    def stats(self) -> dict:
        """Plain numbers (picklable, JSON-able): what the trainer logs."""
        return {"samples": dict(self.good),
                "bad": {n: dict(c) for n, c in self.bad.items()},
                "packed_tokens": self.packed_tokens, "budget_tokens": self.budget_tokens,
                "batches": self.batches}

    def state_dict(self) -> dict:
        return {**self.stats(), "bad_shards": {n: dict(c) for n, c in self.bad_shards.items()}}

    def load_state_dict(self, st: dict) -> None:
        self.good = {n: int(st["samples"].get(n, 0)) for n in self.names}
        self.bad = {n: Counter(st["bad"].get(n, {})) for n in self.names}
        self.bad_shards = {n: Counter(st.get("bad_shards", {}).get(n, {})) for n in self.names}
        self.packed_tokens, self.budget_tokens = int(st["packed_tokens"]), int(st["budget_tokens"])
        self.batches = int(st["batches"])


def merge_stats(per_worker: list[dict]) -> dict:
    """Sum the stats of several workers (or ranks); adds `packing_efficiency` and `bad_fraction`."""
    out = {"samples": Counter(), "bad": {}, "packed_tokens": 0, "budget_tokens": 0, "batches": 0}
    for s in per_worker:
        out["samples"].update(s["samples"])
        for n, c in s["bad"].items():
            out["bad"].setdefault(n, Counter()).update(c)
        for k in ("packed_tokens", "budget_tokens", "batches"):
            out[k] += s[k]
    out["samples"] = dict(out["samples"])
    out["bad"] = {n: dict(c) for n, c in out["bad"].items()}
    out["packing_efficiency"] = out["packed_tokens"] / out["budget_tokens"] if out["budget_tokens"] else 0.0
    nbad = sum(sum(c.values()) for c in out["bad"].values())
    total = nbad + sum(out["samples"].values())
    out["bad_fraction"] = nbad / total if total else 0.0
    return out
