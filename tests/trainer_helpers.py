"""Helpers of the trainer tests: a deterministic stateful batch stream and a tiny pipeline runner.

`GeneratedBatches` yields packed batches (evip/batch.py) derived from (seed, rank, index) only, so
a resumed stream continues with the very batches an uninterrupted one would have produced; its
state is the index. It exercises the trainer's contract with any StatefulDataLoader (iter,
state_dict, load_state_dict); the end-to-end tests use the real loader.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from evip.batch import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "stages" / "pipeline_tiny.yaml"


class GeneratedBatches:
    def __init__(self, model_cfg, seed: int, rank: int, seq_len: int = 32, images: int = 1):
        self.cfg, self.seed, self.rank, self.seq_len, self.images = model_cfg, seed, rank, seq_len, images
        self.index = 0

    def batch(self, index: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + index)
        cfg, t = self.cfg, self.seq_len
        n_img = self.images * cfg.tokens_per_tile
        ids = torch.randint(1, cfg.img_context_token_id, (1, t), generator=g)
        half = t // 2
        ids[0, 1:1 + n_img] = cfg.img_context_token_id          # sample 0: an image then its caption
        labels = ids.clone()
        labels[0, : 1 + n_img] = IGNORE_INDEX
        seq = torch.zeros(1, t, dtype=torch.long)
        seq[0, half:] = 1                                        # sample 1: text only
        pos = torch.cat([torch.arange(half), torch.arange(t - half)])[None]
        kind = torch.zeros(1, t, dtype=torch.long)
        kind[0, half:] = 2
        pix = torch.randn(self.images, 3, cfg.image_size, cfg.image_size, generator=g)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq, "kind_ids": kind,
                "pixel_values": pix}

    def __iter__(self):
        while True:
            b = self.batch(self.index)
            self.index += 1
            yield b

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def generated_factory(stage, source, tokenizer, model_cfg, rank, world_size, seed):
    return lambda: GeneratedBatches(model_cfg, seed * 100 + len(stage.name), rank)


def train_losses(run_dir: Path) -> list[tuple[str, int, float]]:
    """(stage, step, loss) of every train record, the last record of a step winning (resumes)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[(r["stage"], r["step"])] = r["loss"]
    return [(s, i, v) for (s, i), v in sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1]))]
