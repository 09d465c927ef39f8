"""Two ranks through real torchrun (gloo, CPU), the real data loader on generated shards.

- a SIGUSR1 (injected with `faults.signal_after_step`: rank 0 signals itself after a step; rank 1 learns through the all-reduce)
  -> checkpoint at the step boundary -> exit 75 on every rank -> rerun continues; losses
  bit-identical to an uninterrupted 2-rank run, across the stage boundary;
- the same preempted run resumed by ONE process (world size 2 -> 1): DeepSpeed universal checkpoint
  + elastic data state; it continues at the saved step and finishes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_helpers import ROOT, prepared_tokenizer, train_losses, write_e2e_pipeline

pytestmark = pytest.mark.slow
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]


def _evip(args, env_extra=None, ranks=2, timeout=400):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    head = [*TORCHRUN, "-m", "evip.cli"] if ranks == 2 else [sys.executable, "-m", "evip.cli"]
    return subprocess.run([*head, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tok = prepared_tokenizer(tmp_path_factory.getbasetemp())
    return write_e2e_pipeline(tmp_path_factory.mktemp("dist"), tok, steps=4)


def test_two_ranks_preempt_resume_and_world_size_change(pipeline, tmp_path):
    straight, resumed, fewer = tmp_path / "straight", tmp_path / "resumed", tmp_path / "fewer"
    r = _evip(["run", str(pipeline), "--run-dir", str(straight)])
    assert r.returncode == 0, r.stderr[-3000:]

    r = _evip(["run", str(pipeline), "--run-dir", str(resumed), "s1_1_concept.faults.signal_after_step=2"])
    assert r.returncode != 0 and "preempted" in r.stderr, r.stderr[-3000:]
    assert (resumed / "stages" / "0_s1_1_concept" / "ckpt" / "latest").read_text().strip() == "step_00000003"
    shutil.copytree(resumed, fewer)

    r = _evip(["run", str(pipeline), "--run-dir", str(resumed)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a, b = train_losses(straight), train_losses(resumed)
    assert len(a) == 8 and a == b

    r = _evip(["run", str(pipeline), "--run-dir", str(fewer)], ranks=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 2 ranks, now 1 (universal checkpoint) (step 3)" in r.stdout
    c = train_losses(fewer)
    assert [x[:2] for x in c] == [x[:2] for x in a]
    assert c[:3] == a[:3]                          # before the switch: the 2-rank steps
    assert (fewer / "stages" / "1_s1_2_semantic" / "DONE").is_file()
