"""Checkpoints that prove themselves (in-process runs of one tiny stage, one rank):

- every file of a checkpoint is in its manifest (size + sha256) and evip's own state is JSON +
  safetensors, never a pickle;
- a damaged `latest` (a flipped bit, a truncated file, a missing file, a garbage pointer) is
  reported, kept aside as `damaged-step_N`, and the previous intact checkpoint is resumed from:
  the losses after it equal an uninterrupted run's;
- a disk-full write (ENOSPC, injected through `faults.enospc_step`) stops the run with
  CheckpointWriteError naming the intact checkpoint; the rerun resumes from it;
- no intact checkpoint at all: CheckpointDamaged, not a silent restart of the stage.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evip import checkpoint as ckpt
from evip.exit_codes import CHECKPOINT_IO
from evip.pipeline import load_pipeline, run_pipeline
from evip.signals import Preempted
from evip.state_files import read_state, write_state
from trainer_helpers import TINY, generated_factory, train_losses

STAGE = "0_s1_1_concept"
BASE = ["stages_all.data.recipe=unused.yaml", "s1_1_concept.steps=6", "s1_1_concept.checkpoint.every_steps=2",
        "s1_1_concept.checkpoint.keep_last=3", "s1_1_concept.schedule.kind=constant"]


def _run(run_dir, monkeypatch, *extra):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lp = load_pipeline(TINY, [*BASE, *extra])
    lp.stages = lp.stages[:1]
    return run_pipeline(lp, run_dir, loader_factory=generated_factory)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    run = tmp_path_factory.mktemp("straight")
    _run(run, mp)
    mp.undo()
    return train_losses(run), (run / "stages" / STAGE / "model.safetensors").read_bytes()


def _stopped_at_4(run, monkeypatch):
    with pytest.raises(Preempted):
        _run(run, monkeypatch, "s1_1_concept.faults.signal_after_step=3")   # checkpoint at step 4
    root = run / "stages" / STAGE / "ckpt"
    assert (root / "latest").read_text().strip() == "step_00000004"
    return root


def test_manifest_lists_every_file_and_no_pickle_of_ours(tmp_path, monkeypatch):
    root = _stopped_at_4(tmp_path, monkeypatch)
    path = root / "step_00000004"
    files = ckpt.read_meta(path)["files"]
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "meta.json")
    assert sorted(files) == on_disk and "rank0.json" in files and "rank0.safetensors" in files
    assert all(v["size"] == (path / k).stat().st_size for k, v in files.items())
    assert not [f for f in files if f.endswith(".pt") and not f.startswith("ds/")]
    assert ckpt.verify(path) == []


def _flip(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "bit flip in the model states": lambda c: _flip(next((c / "step_00000004" / "ds").glob("mp_rank_*_model_states.pt"))),
    "truncated optimizer states": lambda c: _truncate(next((c / "step_00000004" / "ds").glob("*optim_states.pt"))),
    "missing rank state": lambda c: (c / "step_00000004" / "rank0.json").unlink(),
    "torn meta.json": lambda c: _truncate(c / "step_00000004" / "meta.json"),
    "garbage pointer": lambda c: (c / "latest").write_bytes(b"\x00\x17step_0"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_is_reported_and_the_previous_intact_one_used(tmp_path, monkeypatch, capsys, straight, damage):
    root = _stopped_at_4(tmp_path, monkeypatch)
    DAMAGE[damage](root)
    capsys.readouterr()
    _run(tmp_path, monkeypatch)
    out = capsys.readouterr().out
    losses, weights = straight
    assert train_losses(tmp_path) == losses                       # same losses as never interrupted
    assert (tmp_path / "stages" / STAGE / "model.safetensors").read_bytes() == weights
    if damage == "garbage pointer":                               # step 4 itself is intact: used
        assert "not a checkpoint name" in out and "resumed from" in out and "step_00000004" in out
    else:
        assert "step_00000004 is damaged and will not be used" in out, out
        assert "resumed from" in out and "step_00000002" in out
        assert (root / "damaged-step_00000004").is_dir()          # kept for inspection
        records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 3, 4, 5, 6]


def test_disk_full_during_a_checkpoint_stops_cleanly_and_the_rerun_resumes(tmp_path, monkeypatch, straight):
    with pytest.raises(ckpt.CheckpointWriteError, match=r"No space left on device.*last complete checkpoint is "
                                                        r"step_00000002") as e:
        _run(tmp_path, monkeypatch, "s1_1_concept.faults.enospc_step=4")
    assert e.value.errno == 28
    root = tmp_path / "stages" / STAGE / "ckpt"
    assert (root / "latest").read_text().strip() == "step_00000002" and (root / ".tmp-step_00000004").is_dir()
    _run(tmp_path, monkeypatch)
    assert train_losses(tmp_path) == straight[0]
    assert not list(root.glob(".tmp-*"))


def test_no_intact_checkpoint_stops_instead_of_restarting_the_stage(tmp_path, monkeypatch):
    root = _stopped_at_4(tmp_path, monkeypatch)
    for step in ("step_00000002", "step_00000004"):
        _flip(root / step / "rank0.safetensors")
    with pytest.raises(ckpt.CheckpointDamaged, match="no intact checkpoint"):
        _run(tmp_path, monkeypatch)
    assert CHECKPOINT_IO == 74


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=3) | st.integers(0, 9), inner, max_size=3),
    max_leaves=12)


def _same(a, b) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=60, deadline=None)
@given(values)
def test_state_files_round_trip_exactly(tmp_path_factory, value):
    d = tmp_path_factory.mktemp("s")
    state = {"v": value, "arr": np.arange(5, dtype=np.uint32), "t": torch.tensor([1.5, -2.0]), "s": np.int64(7)}
    back = read_state(d, write_state(state, d, "x")[-1].stem)
    assert _same(back["v"], value)
    assert back["arr"].dtype == np.uint32 and (back["arr"] == state["arr"]).all()
    assert torch.equal(back["t"], state["t"]) and type(back["s"]) is np.int64 and back["s"] == 7
