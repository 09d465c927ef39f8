"""Sources: tar shards (indexed and pipe:), path patterns, InternVL jsonl, local HF datasets."""
from __future__ import annotations

import json

import pytest

from data_stream_helpers import make_shards, png_bytes, write_shard
from evip.data.recipe import SourceConfig
from evip.data.record import BadSample
from evip.data.shards import IndexedTar, PipeTar, expand_paths
from evip.data.sources import build_source


def test_patterns_braces_globs_pipes(tmp_path):
    make_shards(tmp_path, "a", 4, 2)
    pat = str(tmp_path / "a-{00001..00002}.tar")
    assert [p[-11:] for p in expand_paths([pat])] == ["a-00001.tar", "a-00002.tar"]
    assert len(expand_paths([str(tmp_path / "a-*.tar")])) == 4
    assert expand_paths(["pipe:cat x-{0..1}.tar"]) == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]
    assert expand_paths([str(tmp_path / "nothing-*.tar")]) == []


def test_indexed_tar_reads_samples_by_index_and_pipe_agrees(tmp_path):
    keys = make_shards(tmp_path, "a", 1, 5)
    shard = str(tmp_path / "a-00000.tar")
    src = build_source(SourceConfig(name="web", paths=[shard]))
    r = src.open(0)
    assert r.random_access and len(r) == 5 and not r.truncated
    rec = r.get(3)
    assert rec.key.endswith(keys[3]) and rec.text == f"caption {keys[3]}"
    assert rec.images == [png_bytes(3)] and rec.meta == {"key": keys[3]} and rec.kind == "caption"
    pipe = build_source(SourceConfig(name="web", paths=[f"pipe:cat {shard}"])).open(0)
    assert not pipe.random_access
    assert pipe.get(1).text == r.get(1).text and pipe.get(4).text == r.get(4).text
    with pytest.raises(IndexError):
        pipe.get(5)
    pipe.close()


def test_truncated_tar_keeps_whole_samples_before_the_break(tmp_path):
    make_shards(tmp_path, "a", 1, 6)
    data = (tmp_path / "a-00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    t = IndexedTar(str(cut))
    assert t.truncated and 0 < len(t) < 6
    for j in range(len(t)):                   # every kept sample is complete
        assert set(t.read(j)[1]) == {"png", "txt", "json"}
    p = PipeTar(f"pipe:cat {cut}")
    n = 0
    with pytest.raises(IndexError):
        while True:
            assert set(p.read(n)[1]) == {"png", "txt", "json"}
            n += 1
    assert p.truncated and n == len(t)


def test_chat_shard_json_conversations(tmp_path):
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    write_shard(tmp_path / "c.tar", ["k_0"], lambda k: [("jpg", b"xx"), ("json", json.dumps(
        {"conversations": conv}).encode())])
    rec = build_source(SourceConfig(name="c", kind="chat", template="chat",
                                    paths=[str(tmp_path / "c.tar")])).open(0).get(0)
    assert rec.conversations == conv and rec.images == [b"xx"] and rec.text is None and rec.kind == "chat"


def test_jsonl_multi_image_text_only_and_missing_image(tmp_path):
    (tmp_path / "img").mkdir()
    for n in ("a.png", "b.png"):
        (tmp_path / "img" / n).write_bytes(png_bytes(len(n)))
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    lines = [{"id": "one", "image": "a.png", "conversations": conv},
             {"id": "two", "image": ["a.png", "b.png"], "conversations": conv},
             {"id": "three", "conversations": conv},
             {"id": "four", "image": "missing.png", "conversations": conv}]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    src = build_source(SourceConfig(name="j", kind="chat", format="jsonl", template="chat",
                                    paths=[str(f)], root=str(tmp_path / "img"), rows_per_shard=3))
    assert src.shards == [f"{f}#0-3", f"{f}#3-4"]
    r = src.open(0)
    assert [len(r.get(i).images) for i in range(3)] == [1, 2, 0]
    assert r.get(1).key == "two" and r.get(1).conversations == conv
    with pytest.raises(BadSample) as e:
        src.open(1).get(0)
    assert e.value.reason == "missing_file"


def test_hf_parquet_and_arrow(tmp_path):
    import datasets
    rows = {"image": [{"bytes": png_bytes(i), "path": None} for i in range(5)],
            "caption": [f"cap {i}" for i in range(5)]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "d.parquet"), batch_size=2)
    ds.save_to_disk(str(tmp_path / "disk"))
    for path in (str(tmp_path / "d.parquet"), str(tmp_path / "disk")):
        src = build_source(SourceConfig(name="h", format="hf", paths=[path], text_column="caption",
                                        rows_per_shard=2))
        assert len(src.shards) == 3
        rec = src.open(1).get(1)
        assert rec.text == "cap 3" and rec.images == [png_bytes(3)], path


def test_hf_streaming_shards_read_forward_in_the_stream(tmp_path):
    import datasets

    from evip.data.stream import SlotStream
    for f in range(3):
        ds = datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(i), "path": None} for i in range(4)],
                                         "text": [f"cap {f}-{i}" for i in range(4)]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "text": datasets.Value("string")}))
        ds.to_parquet(str(tmp_path / f"part-{f}.parquet"))
    src = build_source(SourceConfig(name="s", format="hf", streaming=True, paths=[str(tmp_path / "*.parquet")]))
    assert len(src.shards) == 3
    got = []
    for slot in range(2):                     # 3 shards over 2 slots, one epoch each
        st = SlotStream([src], [1.0], seed=0, slot=slot, num_slots=2)
        while True:
            _, rec = st.next()
            if st.cursors[0].epoch:
                break
            got.append(rec.text)
            assert rec.images[0] == png_bytes(int(rec.text[-1]))
    assert sorted(got) == sorted(f"cap {f}-{i}" for f in range(3) for i in range(4))
