"""A real local SLURM cluster for the launch tests (.ci/slurm_up.sh) and small client helpers.

The `slurm` fixture uses the cluster named by SLURM_CONF, or starts one with .ci/slurm_up.sh
(and stops it afterwards). Where SLURM cannot be installed or started the tests skip with the
reason, except in CI (CI=true), where they fail instead.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONF = Path(os.environ.get("EVIP_SLURM_DIR", "/tmp/evip-slurm")) / "slurm.conf"


def _cluster_answers(conf: str) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a"], env={**os.environ, "SLURM_CONF": conf},
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "low" in out.stdout and "high" in out.stdout


@pytest.fixture(scope="session")
def slurm():
    """SLURM_CONF of a running cluster with partitions `low` (preemptable) and `high`."""
    conf = os.environ.get("SLURM_CONF") or str(DEFAULT_CONF)
    started = False
    if not _cluster_answers(conf):
        up = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_up.sh")], capture_output=True, text=True,
                            timeout=600)
        conf = str(DEFAULT_CONF)
        if up.returncode != 0 or not _cluster_answers(conf):
            reason = (f"no SLURM cluster: .ci/slurm_up.sh exited {up.returncode}: "
                      f"{(up.stderr or up.stdout)[-1500:]}")
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(reason + " (CI=true: the SLURM tests must run)")
            pytest.skip(reason)
        started = True
    os.environ["SLURM_CONF"] = conf
    yield conf
    if started:
        subprocess.run(["bash", str(ROOT / ".ci" / "slurm_down.sh")], capture_output=True, timeout=120)


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "SBATCH_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "EVIP_MASTER_ADDR")}
    env.update({"SLURM_CONF": os.environ["SLURM_CONF"], "PYTHONUNBUFFERED": "1", **extra})
    return env


def sbatch(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for(predicate, timeout: float, what: str, log: Path | None = None, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def wait_done(job: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Wait until the job has left the queue for good (finished, failed or cancelled)."""
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_for(lambda: (lambda i: i if i.get("JobState") in final else None)(job_info(job)),
                    timeout, f"job {job} to finish", log)


def cancel(job: str) -> None:
    subprocess.run(["scancel", job], capture_output=True, timeout=30)
