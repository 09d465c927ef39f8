"""Run by the launch tests under torchrun and under SLURM: every rank joins through
`evip.distributed.init_distributed()`, checks the run dir and does a real gloo all_reduce.
Prints one line per rank: `ALLREDUCE_OK rank=R world=W launcher=L sum=S`."""
import socket
import sys

import torch
import torch.distributed as dist

from evip.distributed import check_run_dir, init_distributed

env = init_distributed(timeout_s=float(sys.argv[2]) if len(sys.argv) > 2 else 120.0)
check_run_dir(sys.argv[1], env)
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
expected = env.world_size * (env.world_size + 1) / 2
assert t.item() == expected, (t.item(), expected)
print(f"ALLREDUCE_OK rank={env.rank} world={env.world_size} local_rank={env.local_rank} "
      f"node_rank={env.node_rank} launcher={env.launcher} sum={t.item():g} host={socket.gethostname()}",
      flush=True)
dist.destroy_process_group()
