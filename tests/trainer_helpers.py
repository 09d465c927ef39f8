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


# ---- end-to-end: the real loader on tiny generated shards, the real SmolLM2 tokenizer -------------

def prepared_tokenizer(base_temp: Path) -> Path:
    """SmolLM2's real tokenizer with the image tokens, saved once per session as an HF directory."""
    out = Path(base_temp) / "smollm2_tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        from evip.assets import smollm2
        from evip.model.tokens import load_tokenizer
        load_tokenizer(smollm2()).save_pretrained(str(out))
    return out


def write_e2e_pipeline(root: Path, tokenizer: Path, stages=("s1_1_concept", "s1_2_semantic"), steps: int = 4,
                       overrides: list[str] = ()) -> Path:
    """Caption shards + a recipe + a pipeline of tiny `stages` (ZeRO-2 fp32, real loader, 0 workers)."""
    from data_stream_helpers import make_shards, write_recipe
    root.mkdir(parents=True, exist_ok=True)
    make_shards(root / "shards", "cap", 4, 16)
    recipe = write_recipe(root / "captions.yaml", [{"name": "cap", "kind": "caption", "format": "webdataset",
                                                    "paths": [str(root / "shards" / "cap-*.tar")]}])
    tiny = [f"steps={steps}", "tokens=0", "zero_stage=2", "precision=fp32", "optim.lr=1e-2",
            "schedule.warmup_ratio=0.0", f"data.recipe={recipe}", "data.token_budget=64", "data.rows=1",
            "data.sample.max_length=64", "data.sample.image.max_tiles=1", "data.sample.image.use_thumbnail=false",
            "data.num_workers=0", "checkpoint.every_steps=2", "checkpoint.every_minutes=0", "checkpoint.keep_last=2",
            "eval.every_steps=0", "eval.text_corpus=pydoc", "eval.text_batches=1", "eval.text_seq_len=32",
            *overrides]
    model = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512, image_size=56, patch_size=14,
                 vision_hidden_size=32)
    import yaml
    cfg = {"name": "e2e", "base": {"source": "random", "tokenizer": str(tokenizer), "seed": 0}, "model": model,
           "seed": 0, "wandb": {"enabled": False},
           "stages": [{"name": s, "file": str(ROOT / "stages" / f"{s}.yaml"), "overrides": tiny} for s in stages]}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
