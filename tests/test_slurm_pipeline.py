"""`evip run` of the tiny pipeline under launch/slurm.sbatch on the real local SLURM cluster, 2
ranks: interrupted mid-stage, restarted by SLURM, finished with the losses of an uninterrupted
run (the 2-rank reference of launch_pipeline_helpers, made by two torchrun agents)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launch_pipeline_helpers import TINY, checkpoint_world_sizes, reference_losses, train_losses
from slurm_helpers import ROOT, cancel, clean_env, job_info, sbatch, slurm, wait_done, wait_for  # noqa: F401

pytestmark = pytest.mark.slow


def _steps_done(run: Path, stage: str) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(x)["step"] for x in path.read_text().splitlines()
             if '"train"' in x and f'"{stage}"' in x]
    return max(steps, default=0)


def test_preempted_mid_stage_by_high_priority_job_resumes_with_identical_losses(slurm, tmp_path,
                                                                               tmp_path_factory):
    """A high-priority job preempts the run in s1_2_semantic (4 steps): it is submitted once the
    write of step 2's checkpoint is being held open 8 s (`faults.checkpoint_sleep_*`), so SLURM's
    signal lands mid-stage however fast the steps are (on a fast CPU the whole tiny pipeline
    takes ~7 s), and the rest of the hold, step 3 and its checkpoint fit the partition's 15 s
    GraceTime (a hold much longer gets the job killed instead)."""
    reference, env, overrides, _, _ = reference_losses(tmp_path_factory)
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(["-p", "low", "-N", "2", "-o", str(log), str(ROOT / "launch" / "slurm.sbatch"), TINY,
                  str(run), *overrides, "s1_2_semantic.faults.checkpoint_sleep_step=2",
                  "s1_2_semantic.faults.checkpoint_sleep_s=8"], clean_env(**env))
    try:
        wait_for(lambda: log.exists() and "holding the write of step_00000002" in log.read_text(), 400,
                 "the held write of s1_2_semantic's step 2", log)
        sbatch(["-p", "high", "-N", "2", "--exclusive", "-o", str(tmp_path / "high.log"), "--wrap", "true"],
               clean_env())
        info = wait_done(job, 600, log)
    finally:
        cancel(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-5000:]
    assert "got SIGUSR1: passing it to the tasks" in text
    assert "evip exited 75 (preempted" in text and "requeueing job" in text
    assert "restart 1] start: 2 node(s) x 1 process(es)" in text
    assert train_losses(run) == reference
    assert checkpoint_world_sizes(run) == {2}


def test_sigkill_without_signal_handling_resumes_from_last_periodic_checkpoint(slurm, tmp_path,
                                                                              tmp_path_factory):
    """Task-per-GPU form (2 srun tasks on one node). SIGKILL to the tasks (`scancel
    --signal=KILL JOB.0`, the step: no SIGTERM first, unlike a job cancel) after step 5 of the 8 of
    s1_3_alignment, while step 6's checkpoint is being written (held open 20 s by `faults.checkpoint_sleep_*`, so the
    kill cannot miss the stage however fast its steps are); the batch script reports the killed tasks and fails the job (no requeue: it
    was not a preemption); the newest complete checkpoint is a periodic one (every 2 steps);
    `scontrol requeue` restarts the job, which retrains the steps after it and ends with the
    reference losses."""
    reference, env, overrides, _, _ = reference_losses(tmp_path_factory)
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(["-N", "1", "--ntasks-per-node=2", "-o", str(log), str(ROOT / "launch" / "slurm.sbatch"),
                  TINY, str(run), *overrides, "stages_all.faults.checkpoint_sleep_step=6",
                  "stages_all.faults.checkpoint_sleep_s=20"], clean_env(**env))
    try:
        wait_for(lambda: _steps_done(run, "s1_3_alignment") >= 5, 500, "step 5 of s1_3_alignment", log)
        subprocess.run(["scancel", "--signal=KILL", f"{job}.0"], check=True, timeout=30)
        killed = wait_done(job, 120, log)
        stage = run / "stages" / "2_s1_3_alignment"
        latest = (stage / "ckpt" / "latest").read_text().strip()
        done_at_kill = (stage / "DONE").exists()
        records_at_kill = _steps_done(run, "s1_3_alignment")
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        wait_for(lambda: job_info(job).get("Restarts") == "1", 60, "the requeue", log)
        info = wait_done(job, 600, log)
    finally:
        cancel(job)
    text = log.read_text()
    assert killed["JobState"] == "FAILED" and killed["ExitCode"] in ("137:0", "1:0"), killed
    assert "not requeueing" in text
    assert not done_at_kill and latest == "step_00000004", latest   # step 6's write never published
    retrained = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in x and '"s1_3_alignment"' in x]
    resumed_from = int(latest.split("_")[1])
    assert retrained.count(resumed_from + 1) == 2       # the step after the checkpoint ran twice
    assert retrained.count(resumed_from) == 1 and records_at_kill > resumed_from
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-5000:]
    assert "2 task(s) on 1 node(s), one per GPU" in text and "restart 1] start" in text
    assert train_losses(run) == reference
