"""One rank of tests/test_rank0_work.py, started with RANK/WORLD_SIZE/MASTER_* set (gloo, CPU).

    python rank0_work_script.py MODE COLLECTIVE_TIMEOUT_S WAIT_S WORK_S GO_FILE

Rank 0's work sleeps WORK_S seconds (MODE fail: then raises); the others wait for it through
`on_rank0` (MODE barrier: through dist.barrier, what evip did before). Then every rank does one
all_reduce and prints `RANK0_WORK_OK rank=R`. The ranks join the group once GO_FILE exists (the
test creates it when both have imported torch), so a short collective timeout is not spent on
imports.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

from evip.distributed import init_distributed
from evip.rank0_work import on_rank0

mode, timeout_s, wait_s, work_s, go = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
print("IMPORTED", flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
env = init_distributed(timeout_s=timeout_s)


def work():
    time.sleep(work_s)
    if mode == "fail":
        raise ValueError("base.source /models/llm holds no config.json: point base.source at an HF model directory")


if mode == "barrier":
    if env.rank == 0:
        work()
    dist.barrier()
else:
    on_rank0("build and write the base weights", work, wait_s)
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == env.world_size
print(f"RANK0_WORK_OK rank={env.rank}", flush=True)
dist.destroy_process_group()
