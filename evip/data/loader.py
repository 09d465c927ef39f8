"""The training data loader: recipe -> per-slot record stream -> samples -> packed batches.

    loader = build_loader(cfg.data, tokenizer, model_cfg, rank, world_size)
    for batch in loader:          # exactly evip.batch.BATCH_KEYS: the tensors and their layout
        ...
    stats = loader.stats()        # plain numbers to log (see below)
    state = loader.state_dict()   # save per rank; loader.load_state_dict(state) resumes exactly

Resume. Same ranks and workers: `load_state_dict(this rank's state)` -> the very next batches.
Different ranks or workers (elastic): `load_state_dict([state of rank 0, ..., rank R-1])`, the
states of ALL old ranks; each new worker derives its own position from them (stream.py
`elastic_state`): no consumed sample is repeated and none is lost, in-progress shards included; a
log line says so. What does change: the mixture draws (proportions hold), and the dedup tables
of the filters start empty (they belong to the old workers); counters are summed into slot 0.

What a worker's state is: the stream position *before the oldest sample still held by the
packer* plus the counters at that point. Held samples are not saved; on resume they are re-read
and re-built (deterministic), so the state is small and O(1) to restore: no replaying.

Stats (`loader.stats()`, summed over this rank's workers, as of the batches returned so far):
    samples {source: n}, bad {source: {reason: n}}, packed_tokens, budget_tokens, batches,
    packing_efficiency (real tokens / budget tokens), bad_fraction.
Bad samples are skipped and counted; past `max_bad_fraction` of a source (after
`min_samples_before_threshold` samples) the worker raises TooManyBadSamples naming the source,
the shard and the top reasons.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, replace

from omegaconf import MISSING
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from evip.batch import LAYOUT_KEY
from evip.data.accounting import Accounting, merge_stats
from evip.data.packing import Packer
from evip.data.record import BadSample
from evip.data.recipe import RecipeConfig, filter_config, load_recipe, resolve_template
from evip.data.sample import SampleBuilder, SampleConfig
from evip.data.sources import build_source
from evip.data.stream import SlotStream, elastic_states, fresh_source_state, lanes_of
from evip.model.layout import PackedLayout

log = logging.getLogger(__name__)

_STATS_KEY = "_evip_stats"                     # travels worker -> EvipLoader, removed before you see it


@dataclass
class DataConfig:
    recipe: str = MISSING                      # path of a data_recipes/*.yaml
    recipe_overrides: list[str] = field(default_factory=list)   # dotlist applied to the recipe
    token_budget: int = 4096                   # tokens per packed row (T of the batch)
    rows: int = 1                              # rows per micro-batch (B of the batch)
    max_images_per_pack: int = 16              # cap on image tiles per micro-batch (0: none)
    num_workers: int = 2
    prefetch_factor: int = 2
    pin_memory: bool = False                   # page-locked batches for fast host-to-GPU copies
    seed: int = 0
    max_bad_fraction: float = 0.05
    min_samples_before_threshold: int = 1000
    # per-sample processing: max_length, image tiling (sample.image.*), default filters
    # (sample.filters.*; a recipe source's `filters` override them for that source)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        for key in ("token_budget", "rows", "prefetch_factor"):
            if getattr(self, key) <= 0:
                raise ValueError(f"data.{key}={getattr(self, key)}: must be positive")
        if self.num_workers < 0 or self.max_images_per_pack < 0 or self.min_samples_before_threshold < 0:
            raise ValueError("data.num_workers, data.max_images_per_pack and data.min_samples_before_threshold "
                             "must be >= 0")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction}: must be in [0, 1]")


class PackedStream(IterableDataset):
    """Packed batches of one rank; each DataLoader worker reads its own slot."""

    def __init__(self, cfg: DataConfig, recipe: RecipeConfig, tokenizer, model_cfg, rank: int, world_size: int):
        super().__init__()
        self.cfg, self.recipe, self.tokenizer, self.model_cfg = cfg, recipe, tokenizer, model_cfg
        self.rank, self.world_size = rank, world_size
        self.elastic_states: dict[int, dict] = {}    # slot -> state, set by EvipLoader for elastic resume

    def slots(self) -> list[int]:
        w = max(1, self.cfg.num_workers)
        return [self.rank * w + i for i in range(w)]

    @property
    def num_slots(self) -> int:
        return self.world_size * max(1, self.cfg.num_workers)

    def __iter__(self):
        return PackedIterator(self)


class PackedIterator:
    def __init__(self, ds: PackedStream):
        self.ds = ds
        info = get_worker_info()
        self.worker = info.id if info is not None else 0
        self.slot = ds.slots()[self.worker]
        self._loaded: dict | None = None
        self._ready = False
        self._state: dict | None = None

    # ---- set-up in the worker (lazy: load_state_dict comes after iter()) --------------------
    def _setup(self) -> None:
        ds, cfg = self.ds, self.ds.cfg
        self.sources = [build_source(s) for s in ds.recipe.sources]
        self.names = [s.name for s in ds.recipe.sources]
        self.stream = SlotStream(self.sources, [s.weight for s in ds.recipe.sources], cfg.seed,
                                 self.slot, ds.num_slots)
        self.acc = Accounting(self.names, cfg.max_bad_fraction, cfg.min_samples_before_threshold)
        # a sample must fit a packed row: truncate at min(sample.max_length, token_budget)
        max_length = min(cfg.sample.max_length, cfg.token_budget)
        self.builders = [SampleBuilder(replace(cfg.sample, max_length=max_length, template=resolve_template(s),
                                               filters=filter_config(s, cfg.sample.filters)),
                                       ds.tokenizer, ds.model_cfg) for s in ds.recipe.sources]
        self.packer = Packer(cfg.token_budget, cfg.max_images_per_pack, ds.model_cfg.pad_token_id, cfg.rows)
        start = self._loaded or ds.elastic_states.get(self.slot)
        if start is not None:
            self.stream.load_state_dict(start["stream"])
            self.acc.load_state_dict(start["counts"])
            for b, st in zip(self.builders, start.get("filters") or []):
                b.load_state_dict(st)
        self._state = self._snapshot()
        self._ready = True

    def _snapshot(self) -> dict:
        return {"stream": self.stream.state_dict(), "counts": self.acc.state_dict()}

    # ---- iteration --------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._ready:
            self._setup()
        while True:
            snap = self._snapshot()
            i, rec = self.stream.next()
            name = self.names[i]
            if isinstance(rec, BadSample):
                self.acc.add_bad(name, self.stream.cursors[i].current_shard, rec.reason)
                continue
            try:
                sample = self.builders[i](rec)
                self.packer.check(sample)
            except BadSample as e:
                self.acc.add_bad(name, rec.shard, e.reason)
                continue
            self.acc.ok(name)
            batches = self.packer.add(sample, position=snap)
            if batches:
                return self._emit(batches)

    def _emit(self, batches: list[dict]) -> dict:
        if len(batches) != 1:
            raise RuntimeError(f"the packer emitted {len(batches)} batches for one sample; expected 1")
        batch = batches[0]
        # here on the CPU worker, so that the forward on the GPU needs no host sync to find them
        batch[LAYOUT_KEY] = PackedLayout.of(batch["input_ids"], batch["labels"], batch["seq_ids"],
                                            self.ds.model_cfg.img_context_token_id)
        self.acc.packed(int((batch["seq_ids"] >= 0).sum()), batch["input_ids"].numel())
        # the state is the position before the oldest sample the packer still holds
        base = self.packer.resume_from() or self._snapshot()
        state = {"stream": base["stream"], "counts": {**base["counts"], **_packed(self.acc)}}
        batch[_STATS_KEY] = {"slot": self.slot, "worker": self.worker, "stats": self.acc.stats(),
                             "state": state}
        # Dedup tables as of now: re-building the held samples on resume leaves them unchanged
        # (a record met again in its own shard is not a duplicate), so no per-sample copies.
        self._state = {**state, "filters": [b.state_dict() for b in self.builders]}
        return batch

    def state_dict(self) -> dict:
        if not self._ready:
            return copy.deepcopy(self._loaded) if self._loaded else {}
        return self._state

    def load_state_dict(self, state: dict) -> None:
        if state:
            if (state["stream"]["slot"], state["stream"]["num_slots"]) != (self.slot, self.ds.num_slots):
                raise ValueError("loader state is for another layout; pass the states of all old ranks "
                                 "as a list to EvipLoader.load_state_dict for an elastic resume")
            self._loaded = state
            self._ready = False


def _packed(acc: Accounting) -> dict:
    return {"packed_tokens": acc.packed_tokens, "budget_tokens": acc.budget_tokens, "batches": acc.batches}


class EvipLoader(StatefulDataLoader):
    """StatefulDataLoader over PackedStream (batch_size=None) with stats and elastic resume."""

    def __init__(self, dataset: PackedStream, **kw):
        super().__init__(dataset, batch_size=None, **kw)
        # per slot of this rank, as of the last batch handed out: stream state (global terms,
        # for elastic resume) and counters; a slot that has not yielded yet keeps its start state
        self._slot_states: dict[int, dict] = {}
        self._slot_stats: dict[int, dict] = {}

    def __iter__(self):
        for batch in super().__iter__():
            info = batch.pop(_STATS_KEY)
            self._slot_states[info["slot"]] = info["state"]
            self._slot_stats[info["slot"]] = info["stats"]
            yield batch

    def stats(self) -> dict:
        return merge_stats(list(self._slot_stats.values()) or [Accounting([], 0, 0).stats()])

    def state_dict(self) -> dict:
        ds: PackedStream = self.dataset
        slots = dict(self._slot_states)
        return {"rank": ds.rank, "world_size": ds.world_size, "num_workers": ds.cfg.num_workers,
                "num_slots": ds.num_slots, "slots": slots, "loader": super().state_dict()}

    def load_state_dict(self, state) -> None:
        ds: PackedStream = self.dataset
        if isinstance(state, dict):
            state = [state]
        mine = [s for s in state if s["rank"] == ds.rank]
        lanes = [src.interleave_shards for src in ds.recipe.sources]
        if (state[0]["num_slots"] == ds.num_slots and state[0]["num_workers"] == ds.cfg.num_workers
                and state[0]["world_size"] == ds.world_size and mine
                and all(lanes_of(v["stream"]) == lanes for v in mine[0]["slots"].values())):
            super().load_state_dict(mine[0]["loader"])
            self._slot_states = {int(k): v for k, v in mine[0]["slots"].items()}
            self._slot_stats = {k: _stats_of(v["counts"]) for k, v in self._slot_states.items()}
            return
        old = {}
        for s in state:
            old.update({int(k): v for k, v in s["slots"].items()})
        n_old = state[0]["num_slots"]
        old_lanes = next((lanes_of(v["stream"]) for v in old.values()), lanes)
        fresh = _fresh_states(n_old, old_lanes)
        streams = [(old.get(k) or fresh[k])["stream"] for k in range(n_old)]
        if len(state) != state[0]["world_size"]:
            raise ValueError(f"elastic resume needs the loader states of all {state[0]['world_size']} old ranks, "
                             f"got {len(state)}")
        counts = [(old.get(k) or fresh[k])["counts"] for k in range(n_old)]
        ds.elastic_states = {}
        for slot, stream in elastic_states(streams, ds.slots(), ds.num_slots, lanes).items():
            ds.elastic_states[slot] = {"stream": stream, "counts": merge_counts(counts) if slot == 0
                                       else Accounting([], 0, 0).state_dict()}
        self._slot_states = dict(ds.elastic_states)
        self._slot_stats = {k: _stats_of(v["counts"]) for k, v in self._slot_states.items()}
        log.info("data loader: elastic resume from %d ranks x %d workers to %d x %d (shards read at once per "
                 "source: %s); every position consumed before is skipped, positions held in the packers "
                 "are re-read", state[0]["world_size"], state[0]["num_workers"], ds.world_size,
                 ds.cfg.num_workers, lanes)


def _stats_of(counts: dict) -> dict:
    return {k: counts[k] for k in ("samples", "bad", "packed_tokens", "budget_tokens", "batches")}


def _fresh_states(num_slots: int, lanes: list[int]) -> list[dict]:
    """The states of slots that have not handed out a batch yet."""
    empty = Accounting([], 0, 0).state_dict()
    return [{"stream": {"slot": k, "num_slots": num_slots, "mixture": {"n": 0},
                        "sources": [fresh_source_state(n) for n in lanes]},
             "counts": empty} for k in range(num_slots)]


def merge_counts(counts: list[dict]) -> dict:
    m = merge_stats(counts)
    shards: dict = {}
    for c in counts:
        for n, d in c.get("bad_shards", {}).items():
            for s, v in d.items():
                shards.setdefault(n, {}).setdefault(s, 0)
                shards[n][s] += v
    return {"samples": m["samples"], "bad": m["bad"], "packed_tokens": m["packed_tokens"],
            "budget_tokens": m["budget_tokens"], "batches": m["batches"], "bad_shards": shards}


def build_loader(cfg: DataConfig, tokenizer, model_cfg, rank: int, world_size: int) -> EvipLoader:
    """Validate the recipe (before any worker starts), then build this rank's loader."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    recipe = load_recipe(cfg.recipe, cfg.recipe_overrides)
    ds = PackedStream(cfg, recipe, tokenizer, model_cfg, rank, world_size)
    kw = {"num_workers": cfg.num_workers, "pin_memory": cfg.pin_memory}
    if cfg.num_workers > 0:
        kw.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
    return EvipLoader(ds, **kw)
