"""Counting samples and bad samples per source and reason, and stopping past a bad fraction.

Counters live in each DataLoader worker, are part of its saved state, and travel to the main
process with every batch (see loader.py `EvipLoader.stats()`). During a run the trainer sums them
over ranks (`gather_stats`) and logs them (`data_record`): per source the samples used, bad
samples and filtered samples per reason, the realised mixture, and the packing efficiency.
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


def gather_stats(local: dict | None) -> dict | None:
    """The loader stats of every rank summed (a collective: every rank calls it); None without
    stats (a loader that keeps none)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, local)
        every = [s for s in every if s is not None]
    else:
        every = [local] if local is not None else []
    return merge_stats(every) if every else None


def data_record(stats: dict) -> dict:
    """Flat numbers for metrics.jsonl and wandb, from (merged) loader stats:
    data/samples/SRC, data/mixture/SRC (share of the samples used), data/bad/SRC/REASON,
    data/filtered/SRC/REASON (the filters' reasons), data/bad_fraction, data/filtered_fraction
    (of all samples read), data/packing_efficiency (real tokens / token budget)."""
    from evip.data.filters import FILTER_REASONS
    used = sum(stats["samples"].values())
    rec: dict = {}
    nbad = nfiltered = 0
    for src, n in sorted(stats["samples"].items()):
        rec[f"data/samples/{src}"] = n
        rec[f"data/mixture/{src}"] = n / used if used else 0.0
    for src, reasons in sorted(stats["bad"].items()):
        for reason, n in sorted(reasons.items()):
            filtered = reason in FILTER_REASONS
            rec[f"data/{'filtered' if filtered else 'bad'}/{src}/{reason}"] = n
            nfiltered, nbad = nfiltered + n * filtered, nbad + n * (not filtered)
    read = used + nbad + nfiltered
    rec["data/bad_fraction"] = nbad / read if read else 0.0
    rec["data/filtered_fraction"] = nfiltered / read if read else 0.0
    rec["data/packing_efficiency"] = stats.get("packing_efficiency", 0.0)
    return rec


def data_summary(rec: dict) -> str:
    """The console's few words on the data, from `data_record`: packing, bad and filtered shares."""
    return (f"pack {100 * rec['data/packing_efficiency']:.0f}% bad {100 * rec['data/bad_fraction']:.1f}% "
            f"filtered {100 * rec['data/filtered_fraction']:.1f}%")


def one_line(err: BaseException) -> str:
    """The message of a TooManyBadSamples, also when a DataLoader worker raised it (torch then
    prefixes the worker's traceback)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(err):
        last = lines[-1]
        return last.split("TooManyBadSamples: ", 1)[-1]
    return str(err)
