"""launch/slurm.sbatch on a real local SLURM cluster (two slurmd: nodes n1, n2): both launch
forms, preemption by a high-priority job, USR1 to the batch shell, requeue and restart, and the
restart guard. `tests/launch_worker.py` stands in for `evip run` (same command line): each rank
joins via evip.distributed, checks the run dir and does a real gloo all_reduce; on a signal rank 0
publishes ckpt/latest and every rank exits 75. The tiny-pipeline versions are in
test_slurm_pipeline.py."""
from __future__ import annotations

import subprocess

import pytest

from slurm_helpers import ROOT, cancel, clean_env, job_info, sbatch, slurm, wait_done, wait_for  # noqa: F401

pytestmark = pytest.mark.slow
WORKER = str(ROOT / "tests" / "launch_worker.py")


def _events(run):
    path = run / "events.txt"
    return sorted(path.read_text().splitlines()) if path.exists() else []


def _ready(log, n):
    return lambda: log.exists() and log.read_text().count("WORKER_READY") >= n


def test_two_nodes_preempted_by_high_priority_job_requeue_and_resume(slurm, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    env = clean_env(EVIP_ENTRY=WORKER)
    job = sbatch(["-p", "low", "-N", "2", "-o", str(log), str(ROOT / "launch" / "slurm.sbatch"),
                  "tiny.yaml", str(run), "wait=120"], env)
    try:
        wait_for(_ready(log, 2), 120, "both ranks up", log)
        high = sbatch(["-p", "high", "-N", "2", "--exclusive", "-o", str(tmp_path / "high.log"),
                       "--wrap", "echo high-priority-ran"], env)
        info = wait_done(job, 180, log)
    finally:
        cancel(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "got SIGUSR1: passing it to the tasks" in text                   # preempt_send_user_signal
    assert "evip exited 75 (preempted" in text and "requeueing job" in text  # torchrun kept the 75
    assert "[evip-slurm" in text and "restart 1] start: 2 node(s) x 1 process(es)" in text
    assert [e.split()[:4] for e in _events(run)] == [
        ["finished", "rank=0", "world=2", "launcher=torchrun"], ["finished", "rank=1", "world=2", "launcher=torchrun"],
        ["preempted-SIGUSR1", "rank=0", "world=2", "launcher=torchrun"],
        ["preempted-SIGUSR1", "rank=1", "world=2", "launcher=torchrun"],
        ["resumed", "rank=0", "world=2", "launcher=torchrun"], ["resumed", "rank=1", "world=2", "launcher=torchrun"],
        ["started", "rank=0", "world=2", "launcher=torchrun"], ["started", "rank=1", "world=2", "launcher=torchrun"]]
    assert all("restart=1" in e for e in _events(run) if e.startswith(("resumed", "finished")))
    assert "high-priority-ran" in (tmp_path / "high.log").read_text()
    assert wait_done(high, 60)["JobState"] == "COMPLETED"


def test_task_per_gpu_form_usr1_to_batch_shell_requeues_and_resumes(slurm, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(["-N", "1", "--ntasks-per-node=2", "-o", str(log), str(ROOT / "launch" / "slurm.sbatch"),
                  "tiny.yaml", str(run), "wait=120"], clean_env(EVIP_ENTRY=WORKER))
    try:
        wait_for(_ready(log, 2), 120, "both ranks up", log)
        subprocess.run(["scancel", "--signal=USR1", "-b", job], check=True, timeout=30)
        info = wait_done(job, 180, log)
    finally:
        cancel(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "2 task(s) on 1 node(s), one per GPU" in text
    events = _events(run)
    assert [e.split()[0] for e in events] == ["finished", "finished", "preempted-SIGUSR1", "preempted-SIGUSR1",
                                              "resumed", "resumed", "started", "started"], events
    assert all("launcher=slurm" in e and "world=2" in e and "sum=3" in e for e in events)


def test_restarts_without_progress_stop_with_no_progress(slurm, tmp_path):
    """A job that keeps exiting 75 without ever writing a checkpoint is requeued once
    (EVIP_MAX_RESTARTS=0 allows no restart without progress) and then refused with 77."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = sbatch(["-N", "1", "-o", str(log), str(ROOT / "launch" / "slurm.sbatch"), "tiny.yaml", str(run),
                  "exit=75"], clean_env(EVIP_ENTRY=WORKER, EVIP_MAX_RESTARTS="0"))
    try:
        info = wait_done(job, 180, log)
    finally:
        cancel(job)
    text = log.read_text()
    assert info["ExitCode"] == "77:0" and info["Restarts"] == "1", text
    assert "restarted 1 times in a row without progress (limit EVIP_MAX_RESTARTS=0)" in text
    assert str(run) in text and "no checkpoint yet" in text


def test_run_dir_not_writable_fails_clearly(slurm, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    log = tmp_path / "job.log"
    job = sbatch(["-N", "1", "-o", str(log), str(ROOT / "launch" / "slurm.sbatch"), "tiny.yaml",
                  str(blocker / "run")], clean_env(EVIP_ENTRY=WORKER))
    info = wait_done(job, 120, log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"
    assert f"run dir {blocker / 'run'} is not writable" in log.read_text()
