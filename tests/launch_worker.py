"""Stand-in for `evip run` in the launch-mechanics tests (same command line: PIPELINE --run-dir
DIR [key=value...]); it tests the launchers, not the trainer. Every rank joins through
`evip.distributed.init_distributed()`, checks the run dir, does a real gloo all_reduce, then:
- `wait=S`: waits up to S s for SIGUSR1/SIGTERM; on a signal rank 0 records RUN_DIR/ckpt/latest
  (what a checkpoint publishes) and every rank exits PREEMPTED (75) after 1 s of "checkpointing";
- if RUN_DIR/ckpt/latest already exists it reports a resume and exits 0 at once;
- `exit=N`: exits with N after the all_reduce.
Each rank appends one line to RUN_DIR/events.txt."""
import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from evip.distributed import check_run_dir, init_distributed
from evip.exit_codes import PREEMPTED

parser = argparse.ArgumentParser()
parser.add_argument("pipeline")
parser.add_argument("--run-dir", required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_intermixed_args()
opts = dict(o.split("=", 1) for o in args.overrides)

got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda signum, frame: got.append(signum))
env = init_distributed(timeout_s=60)
run_dir = check_run_dir(args.run_dir, env)
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
assert t.item() == env.world_size * (env.world_size + 1) / 2, t
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
latest = run_dir / "ckpt" / "latest"
resumed = latest.exists()


def event(what: str) -> None:
    with open(run_dir / "events.txt", "a") as f:
        f.write(f"{what} rank={env.rank} world={env.world_size} launcher={env.launcher} "
                f"restart={restart} host={socket.gethostname()} sum={t.item():g}\n")


event("resumed" if resumed else "started")
print(f"WORKER_READY rank={env.rank} world={env.world_size} resumed={resumed}", flush=True)
if "exit" in opts:
    sys.exit(int(opts["exit"]))
if not resumed and "wait" in opts:
    deadline = time.monotonic() + float(opts["wait"])
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
    if got:
        time.sleep(1.0)   # the "checkpoint": launchers must wait for it, not tear the worker down
        dist.barrier()
        if env.rank == 0:
            latest.parent.mkdir(exist_ok=True)
            latest.write_text("step_00000001")
        event(f"preempted-{signal.Signals(got[0]).name}")
        sys.exit(PREEMPTED)
event("finished")
if env.rank == 0:   # what `evip run` leaves behind; a pipeline without stages is finished at once
    (run_dir / "pipeline.yaml").write_text("stages: []\n")
dist.destroy_process_group()
