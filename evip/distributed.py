"""Who am I in the job: rank, local rank, world size and rendezvous address, from torchrun, from
SLURM (one srun task per GPU) or from nothing at all (one process), and the process group.

    env = init_distributed()          # sets RANK/WORLD_SIZE/... so DeepSpeed finds them too
    check_run_dir(run_dir, env)       # writable by every rank, and the same directory on every node

Detection order: torchrun (its RANK/LOCAL_RANK/WORLD_SIZE win, also when torchrun itself runs
inside an srun step), then an srun job step (SLURM_STEP_NUM_TASKS + SLURM_PROCID), then a single
process. A SLURM batch shell without srun is a single process: its SLURM_NTASKS counts tasks that
were never started, and waiting for them would hang.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal, Mapping

from evip.parent_death import exit_with_parent, started_by_torchrun

Launcher = Literal["torchrun", "slurm", "single"]

#: exported so the same address reaches every srun task; set it in the batch script.
MASTER_ADDR_VAR = "EVIP_MASTER_ADDR"


class DistributedError(RuntimeError):
    """The process group could not be formed; the message names the address and what to check."""


class RunDirError(RuntimeError):
    """The run directory is not writable, or not the same directory on every node."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: Launcher

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, -(-self.world_size // max(1, self.local_world_size)))

    def env_vars(self) -> dict[str, str]:
        """The torch `env://` variables (DeepSpeed reads the same ones)."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size), "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "GROUP_RANK": str(self.node_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (good enough for a single process or a test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise DistributedError(f"environment variable {key} is not set (launcher variables incomplete)")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {key}={value!r} is not an integer") from None


def _slurm_tasks_on_first_count(spec: str) -> int:
    """SLURM_STEP_TASKS_PER_NODE looks like '4(x2),3' or '2': tasks on the node of this spec item."""
    first = spec.split(",")[0]
    return int(first.split("(")[0])


def slurm_first_node_addr(nodelist: str) -> str:
    """The address of the first node of a SLURM node list. Node names need not resolve (two
    slurmd on one machine, clusters with private names), so ask slurmctld for its NodeAddr."""
    try:
        names = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                               capture_output=True, text=True, timeout=30).stdout.split()
        first = names[0]
        info = subprocess.run(["scontrol", "show", "node", first], check=True,
                              capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise DistributedError(
            f"cannot resolve the master address from SLURM node list {nodelist!r} ({e}); set "
            f"{MASTER_ADDR_VAR} (or MASTER_ADDR) in the batch script") from None
    for field in info.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return first


def _slurm_master_port(env: Mapping[str, str]) -> int:
    """Every task must agree on the port without talking: derive it from the job id."""
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    return 20000 + _int(env, "SLURM_JOB_ID", 0) % 20000


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (no side effects; `init_distributed` exports them)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        return DistEnv(rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK", 0),
                       world_size=world, local_world_size=local_world,
                       node_rank=_int(env, "GROUP_RANK", _int(env, "RANK") // max(1, local_world)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=_int(env, "MASTER_PORT", 29500), launcher="torchrun")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        addr = env.get(MASTER_ADDR_VAR) or env.get("MASTER_ADDR")
        if not addr:
            addr = slurm_first_node_addr(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
        return DistEnv(rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID", 0),
                       world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
                       local_world_size=_slurm_tasks_on_first_count(tasks_per_node),
                       node_rank=_int(env, "SLURM_NODEID", 0), master_addr=addr,
                       master_port=_slurm_master_port(env), launcher="slurm")
    return DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                   master_addr="127.0.0.1", master_port=free_port(), launcher="single")


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of this process. One visible device (srun --gpus-per-task=1, or
    CUDA_VISIBLE_DEVICES set per task) is the task's own GPU whatever its LOCAL_RANK; with
    several visible devices LOCAL_RANK indexes them (torchrun, srun with all GPUs visible)."""
    if device_count == 1:
        return 0
    if 0 <= local_rank < device_count:
        return local_rank
    raise DistributedError(
        f"LOCAL_RANK={local_rank} but this process sees {device_count} GPUs: start at most one process "
        f"per GPU (torchrun --nproc-per-node, or srun --ntasks-per-node with one GPU per task), or show "
        f"each task one GPU (srun --gpus-per-task=1)")


def backend_and_device(local_rank: int) -> tuple[str, str]:
    import torch
    if torch.cuda.is_available():
        return "nccl", f"cuda:{cuda_device_index(local_rank, torch.cuda.device_count())}"
    return "gloo", "cpu"


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Detect the launcher, export the env:// variables, pick the device and form the process group.

    `timeout_s` bounds the rendezvous and every collective. On CUDA the backend is nccl and the
    current device is cuda:LOCAL_RANK (cuda:0 when the process sees one GPU); otherwise gloo on
    CPU. Calling it twice is harmless.
    """
    import torch
    import torch.distributed as dist

    env = detect_env()
    if started_by_torchrun():      # a kill -9 of the torchrun agent must not leave this worker behind
        exit_with_parent()
    os.environ.update(env.env_vars())
    default_backend, device = backend_and_device(env.local_rank)
    backend = backend or default_backend
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))   # DeepSpeed takes it from here (evip/engine.py)
    if dist.is_available() and dist.is_initialized():
        return env
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                                world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError, dist.DistError) as e:
        raise DistributedError(
            f"rank {env.rank}/{env.world_size} ({env.launcher}) could not join the process group at "
            f"MASTER_ADDR:MASTER_PORT = {env.master_addr}:{env.master_port} within {timeout_s:.0f} s "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check that every rank "
            f"was started (same WORLD_SIZE={env.world_size} on all), that {env.master_addr} is the "
            f"first node's address reachable from this node (not a name that does not resolve), "
            f"and that port {env.master_port} is free there and not firewalled.") from e
    return env


def _from_rank0(obj):
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_probe(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{socket.gethostname()}\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunDirError(
            f"run dir {path.parent} is not writable from host {socket.gethostname()} "
            f"({e.strerror or e}): pass --run-dir on a filesystem this job can write (check the "
            f"permissions, quota and that it is mounted on every node)") from None


def check_run_dir(run_dir: str | os.PathLike, env: DistEnv | None = None,
                  visibility_wait_s: float = 10.0) -> Path:
    """Fail early, on every rank, when the run dir is not writable or (several ranks) not one
    shared directory: each rank writes a marker naming its host and rank; after a barrier every
    rank must see every marker. Returns the resolved path."""
    env = env or detect_env()
    run_dir = Path(run_dir).resolve()
    host = socket.gethostname()
    import torch.distributed as dist
    multi = env.world_size > 1 and dist.is_available() and dist.is_initialized()
    token = _from_rank0(uuid.uuid4().hex if env.is_main else None) if multi else uuid.uuid4().hex
    check_dir = run_dir / ".evip-rundir-check" / token
    _write_probe(check_dir / f"rank{env.rank}.{host}")
    if not multi:
        _remove_check_dir(check_dir)
        return run_dir
    dist.barrier()
    expected = {f"rank{r}" for r in range(env.world_size)}
    deadline = time.monotonic() + visibility_wait_s
    while True:   # network filesystems may show new files a moment late
        seen = {p.name.split(".", 1)[0] for p in check_dir.iterdir()}
        if expected <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = sorted(expected - seen, key=lambda s: int(s[4:]))
    views = [None] * env.world_size
    dist.all_gather_object(views, (env.rank, host, missing))
    bad = [(r, h, m) for r, h, m in views if m]
    if bad:
        detail = "; ".join(f"rank {r} on {h} does not see the markers of {', '.join(m)}" for r, h, m in bad)
        raise RunDirError(
            f"run dir {run_dir} is not one shared directory across the job's nodes: {detail}. "
            f"Put --run-dir on shared storage mounted at the same path on every node (e.g. a "
            f"parallel filesystem, not /tmp or a node-local disk).")
    dist.barrier()
    if env.is_main:
        _remove_check_dir(check_dir)
    return run_dir


def _remove_check_dir(check_dir: Path) -> None:
    for p in check_dir.iterdir():
        p.unlink()
    check_dir.rmdir()
    try:
        check_dir.parent.rmdir()          # only when no other check is running
    except OSError:
        pass
