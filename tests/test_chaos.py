"""Chaos: the whole tiny 2-rank, 4-stage job (one torchrun agent, 2 workers, launch/torchrun.sh) is
kill -9'd again and again at instants a seeded RNG picks, and rerun until it finishes; the final
weights of every stage and every step's loss must equal those of an uninterrupted run (the 2-rank
reference of launch_pipeline_helpers, shared with the other launch tests).

The kill plan (seed CHAOS_SEED) mixes three kinds, so that kills land where they hurt:
- `step`: a random delay after this attempt trained its first step (anywhere in the loop, evals,
  periodic checkpoints);
- `checkpoint`: the instant this attempt's first checkpoint write (`.tmp-step_*`) appears;
- `handoff`: the instant a stage's consolidated weights are being written or its DONE appears,
  before the next stage has trained.
Where each kill landed is read from the run dir at the instant of the kill (just before it) and printed (run
pytest with -s to see the table); every kill counts only if training had started in that attempt.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from evip.torchrun import child_pids
from launch_pipeline_helpers import ROOT, TINY, clean_env, reference_losses, train_losses

pytestmark = pytest.mark.slow

CHAOS_SEED = 14
KILLS = 10
STAGES = ["0_s1_1_concept", "1_s1_2_semantic", "2_s1_3_alignment", "3_s2_instruct"]


def _plan(rng: random.Random) -> list[tuple[str, float]]:
    """KILLS + 1 kills (one spare), in the order the job meets them: in each of the first three
    stages two kills of a seeded kind (`checkpoint` makes no progress: the attempt dies writing
    the checkpoint after the one it resumed from; `step` little: a delay of at most 50 ms after
    the attempt's first step), then the `handoff` kill that ends the stage; in the last stage two
    `checkpoint` kills (a `handoff` there would end the job). So the job cannot run out of work
    before the plan does, however fast this machine trains."""
    plan: list[tuple[str, float]] = []
    for _ in STAGES[:-1]:
        plan += [(k, rng.uniform(0.0, 0.05)) for k in rng.choices(["checkpoint", "step"], k=2)]
        plan.append(("handoff", 0.0))
    return plan + [("checkpoint", 0.0)] * 2


def _train_records(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.exists() else 0


def _new(paths, since: float) -> list[Path]:
    """Those of `paths` made in this attempt (a killed attempt may leave some behind)."""
    out = []
    for p in paths:
        try:
            if p.stat().st_mtime >= since:
                out.append(p)
        except FileNotFoundError:
            pass
    return sorted(out)


def _where(run: Path, since: float) -> str:
    """What the job was doing at this instant, from the run dir."""
    tmp = _new(run.glob("stages/*/ckpt/.tmp-*"), since)
    if tmp:
        return f"checkpoint write {tmp[-1].parent.parent.name}/{tmp[-1].name}"
    weights = _new(run.glob("stages/*/.model.safetensors.tmp"), since)
    if weights:
        return f"hand-off: writing {weights[-1].parent.name}/model.safetensors"
    done = [s for s in STAGES if (run / "stages" / s / "DONE").exists()]
    written = [s for s in STAGES if s not in done and (run / "stages" / s / "model.safetensors").exists()]
    if written:
        return f"hand-off: {written[0]} weights written, before its DONE"
    if done and len(done) < len(STAGES):
        nxt = run / "stages" / STAGES[len(done)] / "ckpt"
        if not nxt.exists() or not any(nxt.glob("step_*")):
            return f"hand-off: {done[-1]} DONE, {STAGES[len(done)]} before its first checkpoint"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x] \
        if (run / "metrics.jsonl").exists() else []
    last = steps[-1] if steps else {}
    return f"training {last.get('stage', '?')} after step {last.get('step', '?')}"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    from evip.lease import pid_alive
    deadline = time.monotonic() + timeout
    while any(pid_alive(p, None) for p in pids):
        assert time.monotonic() < deadline, f"workers {pids} still alive"
        time.sleep(0.05)


def _start(run: Path, env: dict, overrides: list[str]) -> subprocess.Popen:
    from evip.distributed import free_port
    return subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), TINY, str(run), *overrides],
                            cwd=ROOT, env={**env, "NPROC": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait(proc, cond, timeout: float = 900.0, poll: float = 0.005) -> bool:
    """Poll until `cond()` (True) or the job ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("chaos attempt timed out")


def test_kill_9_at_random_instants_then_rerun_equals_uninterrupted(tmp_path_factory, tmp_path):
    reference, env, overrides, _, ref_run = reference_losses(tmp_path_factory)
    env = clean_env(**env, EVIP_LEASE_HEARTBEAT_S="5")
    rng = random.Random(CHAOS_SEED)
    plan, kills, run = _plan(rng), [], tmp_path / "run"
    attempts = 0
    while True:
        attempts += 1
        assert attempts <= KILLS + 5, f"not finished after {attempts} attempts; kills: {kills}"
        since = time.time() - 1.0
        proc = _start(run, env, overrides)
        if len(kills) < len(plan):
            kind, arg = plan[len(kills)]
            trained = _train_records(run)
            if _wait(proc, lambda: _train_records(run) > trained):
                hit = False
                if kind == "step":
                    time.sleep(arg)
                    hit = proc.poll() is None
                elif kind == "checkpoint":
                    seen: set = set()

                    def nth_write():
                        seen.update(_new(run.glob("stages/*/ckpt/.tmp-*"), since))
                        return len(seen) >= arg
                    hit = _wait(proc, nth_write, poll=0.002)
                else:
                    done0 = set(run.glob("stages/*/DONE"))
                    hit = _wait(proc, lambda: bool(_new(run.glob("stages/*/.model.safetensors.tmp"), since))
                                or set(run.glob("stages/*/DONE")) != done0, poll=0.002)
                if hit:
                    workers = child_pids(proc.pid)
                    where = _where(run, since)              # read first: SIGKILL lands a little later
                    os.killpg(proc.pid, signal.SIGKILL)     # the agent and both workers, at once
                    for pid in workers:                     # (they run in sessions of their own)
                        _kill(pid)
                    proc.wait()
                    _wait_gone(workers)
                    kills.append((kind, where))
                    print(f"kill {len(kills)} [{kind}] {where}", flush=True)
                    continue
        assert proc.wait(timeout=600) == 0 or len(kills) < len(plan), f"attempt failed; kills {kills}"
        if all((run / "stages" / s / "DONE").exists() for s in STAGES):
            break
    print(f"\nchaos seed {CHAOS_SEED}: {len(kills)} kills in {attempts} attempts")
    for i, (kind, where) in enumerate(kills, 1):
        print(f"  kill {i:2d} [{kind:10s}] {where}")
    assert len(kills) >= KILLS
    assert sum("checkpoint write" in w for _, w in kills) >= 2, kills
    assert sum("hand-off" in w for _, w in kills) >= 2, kills
    assert train_losses(run) == reference
    for s in STAGES:
        assert (run / "stages" / s / "model.safetensors").read_bytes() == \
            (ref_run / "stages" / s / "model.safetensors").read_bytes(), s
