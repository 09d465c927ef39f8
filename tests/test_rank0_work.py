"""evip.rank0_work: the other ranks wait for rank 0's long host work outside any collective.

Two real processes (gloo on loopback, started with RANK/WORLD_SIZE/MASTER_* like torchrun's
workers, no agent) with the collective timeout lowered to 4 s:
- rank 0's work takes 10 s: a barrier fails on rank 1 (the control), `on_rank0` does not, and the
  process group still works afterwards;
- rank 0's work raises: rank 1 stops at once with Rank0WorkFailed naming rank 0's error.
The wait bound and a lost rank 0 are checked against a stand-in store, in-process.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from evip.distributed import free_port
from evip.rank0_work import WAIT_KEY, Rank0WorkFailed, Rank0WorkTimeout, _wait

SCRIPT = Path(__file__).parent / "rank0_work_script.py"
COLLECTIVE_TIMEOUT_S = 4


def _two_ranks(tmp_path: Path, mode: str, wait_s: float, work_s: float) -> list[subprocess.CompletedProcess]:
    from test_distributed import _clean_env

    port, go = free_port(), tmp_path / f"go-{mode}"
    procs = [subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, str(COLLECTIVE_TIMEOUT_S), str(wait_s), str(work_s), str(go)],
        env=_clean_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:                         # both have imported torch: join the group now
        assert p.stdout.readline().strip() == "IMPORTED", p.stderr.read()[-3000:]
    go.touch()
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.slow
def test_slow_rank0_work_outlasts_the_collective_timeout(tmp_path):
    work_s = 2.5 * COLLECTIVE_TIMEOUT_S
    barrier = _two_ranks(tmp_path, "barrier", 600, work_s)       # the control: what a barrier does
    assert barrier[1].returncode != 0 and "RANK0_WORK_OK" not in barrier[1].stdout, barrier[1].stdout

    polled = _two_ranks(tmp_path, "wait", 600, work_s)
    for rank, r in enumerate(polled):
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"RANK0_WORK_OK rank={rank}" in r.stdout          # and the group still all-reduces


@pytest.mark.slow
def test_rank0_failing_in_its_work_stops_the_others_with_its_error(tmp_path):
    t0 = time.monotonic()
    r0, r1 = _two_ranks(tmp_path, "fail", 600, 0.5)
    assert time.monotonic() - t0 < 60                            # not the 600 s bound
    assert r0.returncode != 0 and "ValueError: base.source /models/llm" in r0.stderr
    assert r1.returncode != 0 and "Rank0WorkFailed" in r1.stderr, r1.stderr[-3000:]
    assert "rank 0 failed to build and write the base weights (ValueError: base.source /models/llm holds " \
           "no config.json: point base.source at an HF model directory)" in r1.stderr
    assert "RANK0_WORK_OK" not in r0.stdout + r1.stdout


class _Store:
    """Stands in for the c10d store: `check` says whether the key exists, or raises."""

    def __init__(self, value: bytes | None = None, error: Exception | None = None):
        self.value, self.error, self.added = value, error, {}

    def check(self, keys):
        if self.error:
            raise self.error
        return self.value is not None

    def get(self, key):
        return self.value

    def add(self, key, n):
        self.added[key] = self.added.get(key, 0) + n
        return self.added[key]


def test_wait_bound_names_the_config_key():
    with pytest.raises(Rank0WorkTimeout, match=rf"rank 3 waited .* for rank 0 to write x.*raise `{WAIT_KEY}` "
                                               rf"\(now 0.005\).*{WAIT_KEY}=1"):
        _wait(_Store(), "k", 3, "write x", 0.3, WAIT_KEY)


def test_lost_rank0_is_reported_not_waited_for():
    with pytest.raises(Rank0WorkFailed, match="lost contact with rank 0 while waiting for it to write x"):
        _wait(_Store(error=RuntimeError("Connection reset by peer")), "k", 1, "write x", 600, WAIT_KEY)


def test_failure_is_acknowledged_for_rank0():
    store = _Store(b"failed\nOSError: No space left on device")
    with pytest.raises(Rank0WorkFailed, match=r"rank 0 failed to write x \(OSError: No space left on device\)"):
        _wait(store, "k", 1, "write x", 600, WAIT_KEY)
    assert store.added == {"k/read": 1}


def test_wait_bound_is_a_pipeline_key():
    from trainer_helpers import TINY

    from evip.config import ConfigError
    from evip.pipeline import load_pipeline
    assert load_pipeline(TINY, ["rank0_wait_minutes=240", "stages_all.data.recipe=unused.yaml"]).cfg.rank0_wait_minutes == 240.0
    with pytest.raises(ConfigError, match="'rank0_wait_minutes' in .*must be > 0"):
        load_pipeline(TINY, ["rank0_wait_minutes=0", "stages_all.data.recipe=unused.yaml"])
