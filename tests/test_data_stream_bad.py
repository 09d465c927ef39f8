"""Corrupt input is skipped and counted per source and reason, never crashes the run; past
max_bad_fraction the run stops with an error naming the source, the shard and the top reasons."""
from __future__ import annotations

import struct
import zlib

import pytest

from data_stream_helpers import (batch_keys, data_config, make_shards, model_config_for, png_bytes,
                                 real_tokenizer, write_recipe, write_shard)
from evip.data.accounting import TooManyBadSamples
from evip.data.loader import build_loader


def png_header_claiming(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h (valid CRC) and no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corrupt_members(k: str):
    i = int(k.rsplit("_", 1)[-1])
    cap = ("txt", f"caption {k}".encode())
    if i == 1:
        return [("jpg", b"\xff\xd8 this is not a jpeg at all" * 10), cap]      # garbage named .jpg
    if i == 2:
        return [("png", png_header_claiming(30000, 30000)), cap]              # decompression bomb
    if i == 3:
        return [("png", png_bytes(3))]                                        # no caption
    if i == 5:                                                                # a real photo
        from matplotlib import cbook
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return [("jpg", f.read()), cap]
    return [("png", png_bytes(i)), cap]


@pytest.fixture(scope="module")
def tok():
    return real_tokenizer()


def test_corrupt_samples_are_skipped_and_counted(tmp_path, tok):
    write_shard(tmp_path / "c-00000.tar", [f"c_{i:05d}" for i in range(8)], corrupt_members)
    make_shards(tmp_path, "t", 1, 8)
    data = (tmp_path / "t-00000.tar").read_bytes()
    (tmp_path / "t-00000.tar").write_bytes(data[: len(data) * 2 // 3])           # truncated tar
    recipe = write_recipe(tmp_path / "r.yaml", [
        {"name": "web", "paths": [str(tmp_path / "c-00000.tar"), str(tmp_path / "t-00000.tar")]}])
    cfg = data_config(recipe, num_workers=2, max_bad_fraction=0.5, min_samples_before_threshold=10)
    loader = build_loader(cfg, tok, model_config_for(tok), 0, 1)
    it = iter(loader)
    keys = [k for _ in range(6) for k in batch_keys(next(it), tok)]
    del it
    assert {"c_00001", "c_00002", "c_00003"}.isdisjoint(keys)
    assert {"c_00000", "c_00004", "c_00005", "t_00000"} <= set(keys)
    stats = loader.stats()
    bad = stats["bad"]["web"]
    assert {"decode", "bomb", "missing_field", "truncated"} <= set(bad), bad
    assert 0 < stats["bad_fraction"] < 0.5 and 0 < stats["packing_efficiency"] <= 1


def test_bad_fraction_threshold_stops_naming_source_and_shard(tmp_path, tok):
    good = make_shards(tmp_path, "ok", 1, 10)
    write_shard(tmp_path / "junk-00000.tar", [f"j_{i:05d}" for i in range(10)],
                lambda k: [("jpg", b"garbage"), ("txt", b"caption")])
    recipe = write_recipe(tmp_path / "r.yaml", [
        {"name": "clean", "paths": [str(tmp_path / "ok-*.tar")]},
        {"name": "noisy_web", "paths": [str(tmp_path / "junk-*.tar")]}])
    cfg = data_config(recipe, num_workers=2, max_bad_fraction=0.2, min_samples_before_threshold=5)
    loader = build_loader(cfg, tok, model_config_for(tok), 0, 1)
    with pytest.raises(TooManyBadSamples) as e:
        for _ in zip(range(50), loader):
            pass
    msg = str(e.value)
    assert "noisy_web" in msg and "junk-00000.tar" in msg and "decode" in msg, msg
    assert len(good) == 10
