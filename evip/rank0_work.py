"""Host work that rank 0 does alone while the other ranks wait, without a collective that can time out.

    on_rank0("write the base weights", work, wait_s=60 * cfg.rank0_wait_minutes)

Rank 0 runs `work()`; every other rank waits until it has finished, then returns too. A barrier
would do the same, but a barrier is a collective bounded by the process group's timeout (30
minutes, evip/distributed.py), and rank 0's work can outlast it at scale: converting a checkpoint
to the universal format, building and writing a base model, writing a stage's consolidated weights
to a slow filesystem. Here the other ranks poll a key in the process group's rendezvous store (no
collective is in flight, so nothing times out) with their own, much longer bound, `wait_s` (the
pipeline's `rank0_wait_minutes`).

Rank 0 failing in its work sets the key to the error: the other ranks stop at once with
`Rank0WorkFailed` naming rank 0's error (rank 0 waits a moment for them to read it, then raises
the original exception). Rank 0 gone (its process killed, taking the store with it) is noticed at
the next poll. Past `wait_s` the others raise `Rank0WorkTimeout` naming the config key to raise.

Every rank calls `on_rank0` at the same points in the same order, as with collectives. The n-th
call of a job uses store key `evip/rank0_work/<n>`; each rank counts its own calls in the store,
so the count needs no state in the process and survives several runs in one process group.
With a lone process (or no process group) `work()` simply runs.
"""
from __future__ import annotations

import time
from typing import Callable

import torch.distributed as dist

#: the pipeline config key that bounds the wait (evip/pipeline.py)
WAIT_KEY = "rank0_wait_minutes"
POLL_S = 0.5
#: how long a failing rank 0 waits for the others to read its error before raising it
ACK_S = 30.0
PREFIX = "evip/rank0_work"


class Rank0WorkFailed(RuntimeError):
    """Rank 0 failed in work the other ranks were waiting for (or its process is gone)."""


class Rank0WorkTimeout(TimeoutError):
    """Rank 0 neither finished nor failed within the wait bound."""


def _store():
    # the store the process group was formed with (env:// or torchrun's agent store); torch keeps
    # it without a public accessor
    from torch.distributed.distributed_c10d import _get_default_store
    return _get_default_store()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:2000]


def on_rank0(what: str, work: Callable[[], None], wait_s: float, key: str = WAIT_KEY) -> None:
    """Rank 0 runs `work()` while the other ranks wait for it (see the module docstring).
    `what` completes "waiting for rank 0 to ..." in messages; `key` names the bound's config key."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        work()
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    store = _store()
    n = store.add(f"{PREFIX}/calls/rank{rank}", 1)
    done = f"{PREFIX}/{n}"
    if rank == 0:
        try:
            work()
        except BaseException as e:
            store.set(done, "failed\n" + _first_line(e))
            _wait_for_readers(store, done + "/read", world - 1)
            raise
        store.set(done, "ok")
        return
    _wait(store, done, rank, what, wait_s, key)


def _wait(store, done: str, rank: int, what: str, wait_s: float, key: str) -> None:
    start = time.monotonic()
    while True:
        try:
            if store.check([done]):
                status = store.get(done).decode()
                break
        except (RuntimeError, dist.DistError) as e:     # the store's server (rank 0 or its agent) is gone
            raise Rank0WorkFailed(
                f"rank {rank} lost contact with rank 0 while waiting for it to {what} ({_first_line(e)}): "
                f"rank 0's process has probably ended (killed, out of memory, or failed). See rank 0's "
                f"log for the cause, fix it and rerun the same command (the run resumes).") from None
        waited = time.monotonic() - start
        if waited > wait_s:
            raise Rank0WorkTimeout(
                f"rank {rank} waited {waited / 60:.1f} min for rank 0 to {what}; it has neither finished "
                f"nor failed. If rank 0 is still working (a large model, a slow filesystem), raise "
                f"`{key}` (now {wait_s / 60:g}) in the pipeline file or on the command line "
                f"({key}={max(1, round(2 * wait_s / 60))}); if it hangs, see what rank 0 is doing "
                f"(its log, py-spy dump). The run resumes with the same command.")
        time.sleep(POLL_S)
    if status == "ok":
        return
    store.add(done + "/read", 1)
    cause = status.split("\n", 1)[1] if "\n" in status else status
    raise Rank0WorkFailed(
        f"rank {rank}: rank 0 failed to {what} ({cause}); every rank stops. The cause and its fix "
        f"are in rank 0's log; rerun the same command once fixed (the run resumes).")


def _wait_for_readers(store, read: str, readers: int) -> None:
    deadline = time.monotonic() + ACK_S
    while time.monotonic() < deadline:
        try:
            if store.add(read, 0) >= readers:
                return
        except (RuntimeError, dist.DistError):
            return
        time.sleep(0.1)
