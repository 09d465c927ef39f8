"""Crash safety of checkpoints and of the run dir, with real processes of `evip run` (one rank,
real loader):

- kill -9 while a checkpoint is being written (the injected fault `faults.checkpoint_sleep_*`
  holds the write open after the engine state is on disk, before publishing): the next start cleans the
  partial directory and resumes from the previous complete checkpoint, with the same losses;
  meanwhile a second `evip run` on the same run dir refuses (exit 73) and touches nothing, and
  the rerun after the kill takes the dead job's lease over;
- an external SIGUSR1 -> checkpoint at the next step boundary -> exit code 75 -> rerun continues.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evip import exit_codes
from evip.checkpoint import LATEST, META, latest_checkpoint, prune, step_name
from trainer_helpers import ROOT, prepared_tokenizer, write_e2e_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tok = prepared_tokenizer(tmp_path_factory.getbasetemp())
    return write_e2e_pipeline(tmp_path_factory.mktemp("ckpt"), tok, stages=("s1_1_concept",), steps=6)


def _start(pipeline, run_dir, overrides=()):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-u", "-m", "evip.cli", "run", str(pipeline), "--run-dir", str(run_dir),
                             *overrides],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, text: str) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"process ended before printing {text!r}:\n{''.join(seen[-40:])}")


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def _tree(run: Path) -> dict[str, int]:
    return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns for p in run.rglob("*")}


def _second_job_refuses(pipeline, run: Path) -> None:
    """While the first job holds a checkpoint write open, a second `evip run` on the same run dir
    exits RUN_DIR_BUSY (73) naming the holder, without creating or changing any file."""
    before = _tree(run)
    t0 = time.monotonic()
    second = _start(pipeline, run)
    out = second.communicate(timeout=120)[0]
    assert time.monotonic() - t0 < 100, "the refusal came after the hold: the tree check below proves nothing"
    assert second.returncode == exit_codes.RUN_DIR_BUSY, out[-3000:]
    assert "in use by another job: pid" in out and "nothing in the run dir was touched" in out
    assert _tree(run) == before


def test_kill_9_during_checkpoint_write_resumes_from_previous(pipeline, tmp_path):
    run = tmp_path / "run"
    proc = _start(pipeline, run, ["stages_all.faults.checkpoint_sleep_step=4", "stages_all.faults.checkpoint_sleep_s=120"])
    _wait_for(proc, "[fault]")
    ckpts = run / "stages" / "0_s1_1_concept" / "ckpt"
    assert (ckpts / ".tmp-step_00000004" / "ds").is_dir()          # the engine state is half published
    _second_job_refuses(pipeline, run)
    proc.kill()                                                     # SIGKILL
    proc.wait()
    assert (ckpts / LATEST).read_text().strip() == "step_00000002"
    killed = _losses(run)

    proc = _start(pipeline, run)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step_00000002" in out
    assert "lease: taking over" in out and "is gone" in out                               # the killed holder
    assert not list(ckpts.glob(".tmp-*"))
    after = _losses(run)[len(killed):]
    assert [s for s, _ in after] == [3, 4, 5, 6]
    assert dict(killed)[3] == dict(after)[3] and dict(killed)[4] == dict(after)[4]   # same batches, same losses
    assert (run / "stages" / "0_s1_1_concept" / "DONE").is_file()


def test_sigusr1_checkpoints_exits_75_and_rerun_continues(pipeline, tmp_path):
    """Step 2's periodic checkpoint is held open 10 s, so the signal sent after step 1 lands
    mid-stage however fast the steps are; the rerun holds nothing (faults are not saved)."""
    run = tmp_path / "run"
    proc = _start(pipeline, run, ["stages_all.faults.checkpoint_sleep_step=2", "stages_all.faults.checkpoint_sleep_s=10"])
    _wait_for(proc, "step 1/6")
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate()[0]
    assert proc.returncode == exit_codes.PREEMPTED, out[-3000:]
    assert "preempted" in out
    step = int((run / "stages" / "0_s1_1_concept" / "ckpt" / LATEST).read_text().strip().split("_")[1])
    assert 2 <= step < 6
    proc = _start(pipeline, run)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    assert [s for s, _ in _losses(run)][-(6 - step):] == list(range(step + 1, 7))


def test_latest_and_retention(tmp_path):
    for s in (2, 4, 6):
        (tmp_path / step_name(s)).mkdir()
        (tmp_path / step_name(s) / META).write_text("{}")
    (tmp_path / ".tmp-step_00000008").mkdir()                         # a partial write: never counted
    (tmp_path / LATEST).write_text(step_name(6))
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [step_name(4), step_name(6)]
    assert latest_checkpoint(tmp_path) == tmp_path / step_name(6)
    (tmp_path / LATEST).write_text(step_name(8))
    with pytest.raises(RuntimeError, match="missing or incomplete"):
        latest_checkpoint(tmp_path)
