"""Workers die with their launcher: a kill -9 of torchrun (or of launch/torchrun.sh, which execs
`python -m evip.torchrun`) leaves no worker behind holding GPUs and the run dir.

torchrun starts each worker in a session of its own, so a signal to the agent's process group
does not reach them, and a killed agent cannot tear them down: they would sleep in their next
collective until its timeout (30 minutes). `exit_with_parent()`, called by every worker that
torchrun started (evip.distributed.init_distributed), arms two mechanisms:

1. Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)` through ctypes: the kernel kills the worker as soon as
   its parent exits. (The kernel ties it to the parent *thread* that forked the worker; torchrun
   forks from its main thread, whose end is the agent's end.)
2. A daemon thread that checks `os.getppid()` every `poll_s` (1 s): once the worker has been
   re-parented (to init or a subreaper), it kills itself with SIGKILL. This covers systems
   without prctl and a parent that died before (1) was armed.

SIGKILL, not a polite signal: the other ranks are dying too, so a checkpoint could not complete;
what is left is what any kill leaves, the last complete checkpoint (evip/checkpoint.py).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1
WATCH_THREAD = "evip-parent-watch"


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, poll_s: float) -> None:
    stop = threading.Event()
    while not stop.wait(poll_s):
        if os.getppid() != parent:
            print(f"[evip] pid {os.getpid()}: the launcher (pid {parent}) is gone; exiting so that no "
                  f"orphaned worker holds the devices", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def exit_with_parent(poll_s: float = 1.0) -> bool:
    """Arm both mechanisms for this process and its current parent; returns whether prctl worked."""
    if any(t.name == WATCH_THREAD for t in threading.enumerate()):
        return True                               # armed already (init_distributed called twice)
    parent = os.getppid()
    armed = _set_pdeathsig(signal.SIGKILL)
    if parent == 1 or os.getppid() != parent:     # the parent died before we were armed
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch, args=(parent, poll_s), name=WATCH_THREAD, daemon=True).start()
    return armed


def started_by_torchrun() -> bool:
    """torchrun's elastic agent sets TORCHELASTIC_RUN_ID for every worker it starts."""
    return "TORCHELASTIC_RUN_ID" in os.environ
