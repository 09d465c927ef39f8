"""Data accounting in a real run (real loader, real SmolLM2 tokenizer, tiny model, one process):
the loader's counters reach metrics.jsonl, the console and `evip report`; a source whose bad
samples pass `max_bad_fraction` stops the run with the source and reasons named (exit 78), and
its last checkpoint is intact."""
from __future__ import annotations

import json
import re

import pytest

from evip import exit_codes
from evip.checkpoint import latest_checkpoint, read_meta, verify
from evip.cli import main as evip_main
from trainer_helpers import prepared_tokenizer, write_e2e_pipeline

pytestmark = pytest.mark.slow


def test_bad_data_is_counted_logged_and_stops_the_run_with_its_checkpoint_intact(tmp_path_factory, capsys):
    import os
    os.environ["WANDB_MODE"] = "disabled"
    from data_stream_helpers import png_bytes, write_shard
    root = tmp_path_factory.mktemp("accounting")
    tok = prepared_tokenizer(tmp_path_factory.getbasetemp())
    pipe = write_e2e_pipeline(root, tok, stages=("s1_1_concept",), steps=40, overrides=[
        "checkpoint.every_steps=1", "data.max_bad_fraction=0.2", "data.min_samples_before_threshold=24",
        "data.sample.filters.max_caption_chars=40"])
    # beside the 4 good shards (glob cap-*.tar): one of undecodable pictures, one of over-long captions
    write_shard(root / "shards" / "cap-bad-0.tar", [f"bad_{i:05d}" for i in range(16)],
                members=lambda k: [("jpg", b"\xff\xd8\xff not a jpeg"), ("txt", f"caption {k}".encode())])
    write_shard(root / "shards" / "cap-long-0.tar", [f"long_{i:05d}" for i in range(16)],
                members=lambda k: [("png", png_bytes(int(k[-5:]))), ("txt", ("very long " * 10 + k).encode())])
    run = root / "run"
    rc = evip_main(["run", str(pipe), "--run-dir", str(run)])
    captured = capsys.readouterr()
    assert rc == exit_codes.BAD_DATA
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("evip run: stopped on bad data: stage 's1_1_concept' after step ")
    assert "source 'cap'" in err and "max_bad_fraction 20.0%" in err and "decode" in err and "Traceback" not in err
    steps_done = int(re.search(r"after step (\d+)", err)[1])
    assert steps_done >= 2
    # the last checkpoint is named, complete and at the last finished step
    latest = latest_checkpoint(run / "stages" / "0_s1_1_concept" / "ckpt")
    assert latest is not None and f"Last checkpoint: {latest} (intact" in err
    assert verify(latest) == [] and read_meta(latest)["counters"]["step"] == steps_done
    # the counters of every step reached metrics.jsonl and the console
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps_done + 1))
    last = train[-1]
    assert last["data/samples/cap"] > 0 and last["data/mixture/cap"] == 1.0
    assert last["data/bad/cap/decode"] > 0 and last["data/filtered/cap/caption_length"] > 0
    assert 0 < last["data/packing_efficiency"] <= 1 and 0 < last["data/bad_fraction"] < 1
    read = last["data/samples/cap"] + last["data/bad/cap/decode"] + last["data/filtered/cap/caption_length"]
    assert last["data/bad_fraction"] == pytest.approx(last["data/bad/cap/decode"] / read)
    assert all(a["data/samples/cap"] <= b["data/samples/cap"] for a, b in zip(train, train[1:]))
    assert re.search(r"step \d+/40 .* pack \d+% bad \d+\.\d% filtered \d+\.\d%", captured.out)
    # and `evip report`
    assert evip_main(["report", str(run)]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert "## Data" in summary
    row = next(line for line in summary.splitlines() if line.startswith("| s1_1_concept | cap |"))
    assert f"decode: {last['data/bad/cap/decode']}" in row and "caption_length:" in row
