"""launch/torchrun.sh + evip.torchrun (signals reach the workers, their exit code comes back) and
the restart guard. Real torchrun agents, gloo on CPU; `tests/launch_worker.py` stands in for
`evip run` where the trainer is not the subject."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evip.distributed import free_port
from evip.exit_codes import NO_PROGRESS, PREEMPTED
from evip.restart_guard import check, main as guard_main

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "EVIP_MASTER_ADDR")}
    env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1", **extra)
    return env


def test_restart_guard_counts_starts_without_progress(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert check(run, max_restarts=1)[0]                    # first start
    assert check(run, max_restarts=1)[0]                    # 1 restart without progress: allowed
    ok, message = check(run, max_restarts=1)                # 2 > 1: refused
    assert not ok
    assert "restarted 2 times in a row without progress" in message
    assert "EVIP_MAX_RESTARTS=1" in message and str(run) in message and "exit code 77" in message
    (run / "s1_1" / "ckpt").mkdir(parents=True)             # a checkpoint appears: count resets
    (run / "s1_1" / "ckpt" / "latest").write_text("step_00000040")
    ok, message = check(run, max_restarts=1)
    assert ok and "0 restart(s) without progress" in message and "step_00000040" in message
    assert guard_main([str(run), "--max-restarts", "1"]) == 0
    assert guard_main([str(run), "--max-restarts", "1"]) == NO_PROGRESS
    assert "Refusing to start again" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_sh_passes_sigusr1_to_workers_and_returns_their_exit_code(tmp_path):
    """USR1 sent to the torchrun agent only (plain torchrun would die of it): both workers get it,
    finish their 'checkpoint' and the script exits PREEMPTED (torchrun alone would say 1)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), "tiny.yaml", str(run), "wait=90"],
        env=_env(NPROC="2", EVIP_ENTRY=str(ROOT / "tests" / "launch_worker.py")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ready, lines = 0, []
    deadline = time.monotonic() + 120
    while ready < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        ready += line.count("WORKER_READY")   # two workers share the pipe: their lines may merge
    assert ready == 2, "".join(lines)
    os.kill(proc.pid, signal.SIGUSR1)        # torchrun.sh execs python -m evip.torchrun: the agent
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == PREEMPTED, out
    assert "got SIGUSR1; passing it to the workers" in out
    events = (run / "events.txt").read_text().splitlines()
    assert sorted(e.split()[0:2] for e in events if e.startswith("preempted")) == [
        ["preempted-SIGUSR1", "rank=0"], ["preempted-SIGUSR1", "rank=1"]]
    assert (run / "ckpt" / "latest").read_text() == "step_00000001"


@pytest.mark.slow
def test_torchrun_sh_two_agents_nnodes_2_on_loopback(tmp_path):
    run = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    env = _env(NPROC="1", NNODES="2", RDZV_ENDPOINT=endpoint, RDZV_ID="two-agents",
               EVIP_ENTRY=str(ROOT / "tests" / "launch_worker.py"))
    procs = [subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), "tiny.yaml", str(run)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    events = sorted((run / "events.txt").read_text().splitlines())
    assert [e.split()[:3] for e in events] == [
        ["finished", "rank=0", "world=2"], ["finished", "rank=1", "world=2"],
        ["started", "rank=0", "world=2"], ["started", "rank=1", "world=2"]]
    assert all("launcher=torchrun" in e and "sum=3" in e for e in events)


def test_torchrun_sh_multi_node_needs_an_endpoint(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "p.yaml", str(tmp_path)],
                         env=_env(NNODES="2"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "needs RDZV_ENDPOINT" in out.stderr


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.slow
def test_kill_9_of_the_torchrun_agent_leaves_no_worker(tmp_path):
    """torchrun starts its workers in sessions of their own: without evip.parent_death they
    outlive a kill -9 of the agent (the issue saw them 38 minutes later). Here both must be gone
    within 5 s."""
    from evip.torchrun import child_pids

    run = tmp_path / "run"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), "tiny.yaml", str(run), "wait=120"],
        env=_env(NPROC="2", EVIP_ENTRY=str(ROOT / "tests" / "launch_worker.py")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    workers = []
    try:
        ready, lines = 0, []
        while ready < 2:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            ready += line.count("WORKER_READY")
        workers = [p for p in child_pids(proc.pid)
                   if "launch_worker.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert len(workers) == 2, "".join(lines)
        os.kill(proc.pid, signal.SIGKILL)                  # the agent (torchrun.sh execs it)
        proc.wait()
        deadline = time.monotonic() + 5
        while not all(map(_gone, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(map(_gone, workers)), f"workers {workers} outlived the agent"
    finally:
        for p in workers:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
