"""`python -m evip.torchrun ARGS...` is torchrun ARGS..., with two changes a requeue loop needs:

1. The workers' exit code comes back. torchrun turns any worker failure into exit code 1, which
   hides PREEMPTED (75), NON_FINITE (76) and NO_PROGRESS (77) from the batch script; here the
   first failing worker's code is returned (a worker killed by signal S gives 128 + S).
2. SIGTERM, SIGUSR1 and SIGUSR2 reaching the agent are passed to its workers and the agent keeps
   waiting for them, so they can checkpoint at the next step boundary and exit on their own.
   (torchrun itself dies on SIGUSR1, and on SIGTERM kills the workers after 30 s.) Under SLURM
   the workers also get the signal directly (the step's processes are all signalled); a second
   copy is harmless because the trainer's handler only records it. SIGINT/SIGHUP/SIGQUIT keep
   torchrun's behaviour (tear down the workers).

If this agent is killed outright (kill -9), its workers, which torchrun starts in sessions of their
own, do not outlive it: each arms a parent-death signal and a watchdog (evip/parent_death.py).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def child_pids(pid: int | None = None) -> list[int]:
    """Direct children of `pid` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in children.read_text().split()]
        except OSError:
            continue
    return sorted(set(found))


def _forward(signum, frame) -> None:
    print(f"evip.torchrun: got {signal.Signals(signum).name}; passing it to the workers "
          f"and waiting for them to checkpoint and exit", file=sys.stderr, flush=True)
    for pid in child_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def exit_code_of(failure_exitcode: int) -> int:
    return failure_exitcode if failure_exitcode >= 0 else 128 - failure_exitcode


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun installs its tear-down handler only for the signals listed here
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = exit_code_of(failure.exitcode)
        print(f"evip.torchrun: worker rank {rank} (pid {failure.pid}) exited with code {code} "
              f"first; returning it", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
