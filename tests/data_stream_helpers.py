"""Tiny data for the stream/loader tests: img2dataset-style tar shards, jsonl, parquet, recipes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import yaml
from PIL import Image


def png_bytes(i: int, size=(24, 16)) -> bytes:
    img = Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, keys: list[str], members=None) -> Path:
    """A webdataset shard: per key an image, a caption `caption <key>` and a json."""
    with tarfile.open(path, "w") as tf:
        for k in keys:
            for ext, data in (members(k) if members else default_members(k)):
                _add(tf, f"{k}.{ext}", data)
    return path


def default_members(k: str):
    i = int(k.rsplit("_", 1)[-1])
    return [("png", png_bytes(i)), ("txt", f"caption {k}".encode()),
            ("json", json.dumps({"key": k}).encode())]


def make_shards(root: Path, prefix: str, n_shards: int, per_shard: int) -> list[str]:
    """Shards {prefix}-00000.tar ... with keys {prefix}_{global index}; returns all keys."""
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        ks = [f"{prefix}_{s * per_shard + j:05d}" for j in range(per_shard)]
        write_shard(root / f"{prefix}-{s:05d}.tar", ks)
        keys += ks
    return keys


def write_recipe(path: Path, sources: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"name": path.stem, "sources": sources}))
    return path


# ---- the real tokenizer and a model config that matches it ---------------------------------
_TOK = {}


def real_tokenizer():
    """SmolLM2's real tokenizer with the image tokens (evip.model.tokens.load_tokenizer), loaded once."""
    if "tok" not in _TOK:
        from evip.assets import smollm2
        from evip.model.tokens import load_tokenizer
        _TOK["tok"] = load_tokenizer(smollm2())
    return _TOK["tok"]


def tokenizer_pickle(dirpath: Path) -> Path:
    """The tokenizer pickled (0.2 s to load in a subprocess instead of 10 s from GGUF)."""
    import pickle
    p = dirpath / "tokenizer.pkl"
    if not p.exists():
        p.write_bytes(pickle.dumps(real_tokenizer()))
    return p


def model_config_for(tok, **kw):
    from conftest import tiny_model_config
    from evip.model.tokens import IMG_CONTEXT
    return tiny_model_config(vocab_size=len(tok), img_context_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT),
                             pad_token_id=tok.pad_token_id or 0, **kw)


def data_config(recipe: Path, **kw):
    """A small DataConfig: 2 rows x 96 tokens, at most 2 tiles (of 56 px) per image."""
    from evip.data.images import ImageConfig
    from evip.data.loader import DataConfig
    from evip.data.sample import SampleConfig
    sample = SampleConfig(max_length=96, image=ImageConfig(max_tiles=2))
    base = dict(recipe=str(recipe), token_budget=96, rows=2, max_images_per_pack=16, num_workers=2,
                seed=0, sample=sample)
    base.update(kw)
    return DataConfig(**base)


def batch_keys(batch, tok) -> list[str]:
    """The sample keys in a packed batch, read back from the captions `caption <key>`."""
    import re
    out = []
    for b in range(batch["input_ids"].shape[0]):
        ids, seq = batch["input_ids"][b], batch["seq_ids"][b]
        for s in range(int(seq.max()) + 1):
            text = tok.decode(ids[seq == s].tolist())
            m = re.search(r"caption (\w+_\d+)", text)
            assert m, text
            out.append(m.group(1))
    return out
