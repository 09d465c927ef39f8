"""The run-dir lease (evip/lease.py): real holder processes, killed for real.

- a live holder: a second taker refuses, naming the holder, and touches nothing;
- the holder kill -9'd: the next taker takes over with a log line (same host, process gone);
- a SLURM requeue of the holder's job (same SLURM_JOB_ID, higher SLURM_RESTART_COUNT) takes over
  at once, though the old process is still alive; another job id does not;
- a holder on another host: taken over only once its heartbeat is older than the stale time;
- a holder whose lease was taken over exits with RUN_DIR_BUSY at its next heartbeat;
- eight processes racing for a dead holder's lease: exactly one wins.
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

from evip.exit_codes import RUN_DIR_BUSY
from evip.lease import LEASE, Lease, RunDirBusy

HOLD = ("import sys, time; from evip.lease import Lease; l = Lease.acquire(sys.argv[1]); "
        "print('HELD', flush=True); time.sleep(float(sys.argv[2])); l.release(); print('RELEASED', flush=True)")


def _holder(run_dir: Path, seconds: float = 60, **env) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], env={**e, **env},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout.readline().strip() == "HELD"
    return p


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)


def test_live_holder_refuses_then_kill_9_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    try:
        before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
        with pytest.raises(RunDirBusy) as e:
            Lease.acquire(tmp_path)
        msg = str(e.value)
        assert f"pid {holder.pid} on {os.uname().nodename}" in msg and "in use by another job" in msg
        assert f"Exit code {RUN_DIR_BUSY}" in msg and "nothing in the run dir was touched" in msg
        assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    logged = []
    lease = Lease.acquire(tmp_path, log=logged.append)
    assert lease.owned() and len(logged) == 1
    assert f"taking over {tmp_path / LEASE} from pid {holder.pid}" in logged[0] and "is gone" in logged[0]
    lease.release()
    assert not (tmp_path / LEASE).exists()


def test_slurm_requeue_of_the_same_job_takes_over_at_once(tmp_path, monkeypatch):
    holder = _holder(tmp_path, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4243")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        with pytest.raises(RunDirBusy, match="SLURM job 4242 \\(restart 0\\)"):
            Lease.acquire(tmp_path)                      # another job: refused
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        logged = []
        lease = Lease.acquire(tmp_path, log=logged.append)  # its own requeue: taken at once
        assert "SLURM requeued job 4242 (restart 0 -> 1)" in logged[0]
        held = json.loads((tmp_path / LEASE).read_text())
        assert (held["slurm_job_id"], held["slurm_restart_count"], held["pid"]) == ("4242", 1, os.getpid())
        lease.release()
    finally:
        holder.kill()
        holder.wait()


def test_holder_on_another_host_is_taken_over_only_when_its_heartbeat_is_stale(tmp_path):
    record = {"token": "t", "host": "other-node", "pid": 1, "pid_start": None, "slurm_job_id": "",
              "slurm_restart_count": 0, "started": time.time() - 1000, "heartbeat": time.time() - 10}
    (tmp_path / LEASE).write_text(json.dumps(record))
    with pytest.raises(RunDirBusy, match="pid 1 on other-node"):
        Lease.acquire(tmp_path, stale_s=60)
    record["heartbeat"] = time.time() - 61
    (tmp_path / LEASE).write_text(json.dumps(record))
    logged = []
    Lease.acquire(tmp_path, stale_s=60, log=logged.append).release()
    assert "heartbeat is 61 s old" in logged[0]


def test_a_holder_whose_lease_was_taken_exits_at_its_next_heartbeat(tmp_path):
    holder = _holder(tmp_path, 60, EVIP_LEASE_HEARTBEAT_S="0.2")
    (tmp_path / LEASE).unlink()
    taker = Lease.acquire(tmp_path, heartbeat_s=60)           # as after judging the holder dead
    try:
        out, _ = holder.communicate(timeout=10)
    finally:
        taker.release()
    assert holder.returncode == RUN_DIR_BUSY and "was taken over by another job" in out


RACE = ("import sys, time; from evip.lease import Lease, RunDirBusy\n"
        "try:\n    l = Lease.acquire(sys.argv[1], log=lambda m: None)\n"
        "except RunDirBusy:\n    print('REFUSED'); sys.exit(0)\n"
        "print('WON', flush=True); time.sleep(3); l.release()")


def test_racing_takers_of_a_dead_holders_lease_exactly_one_wins(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"token": "dead", "host": os.uname().nodename, "pid": int(dead.stdout), "pid_start": None,
              "slurm_job_id": "", "slurm_restart_count": 0, "started": time.time(), "heartbeat": time.time()}
    (tmp_path / LEASE).write_text(json.dumps(record))
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["REFUSED"] * 7 + ["WON"], outs


def test_a_run_dir_where_no_lease_can_be_made_is_a_run_dir_error_not_a_hang(tmp_path):
    from evip.distributed import RunDirError
    from evip.lease import hold_run_dir
    with pytest.raises(RunDirError, match="cannot create its lease"):
        hold_run_dir("/proc/evip-no-such-dir/run", rank=0)
