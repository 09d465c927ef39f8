"""evip.distributed: launcher detection, process-group set-up, run-dir checks. Multi-process
cases start real processes (torchrun agents with c10d rendezvous on loopback, gloo); the
plain two-agent all_reduce is in test_launch.py (through launch/torchrun.sh)."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from evip.distributed import DistEnv, detect_env, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_allreduce.py"


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "EVIP_MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def test_detect_torchrun_variables():
    env = detect_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                      "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29511",
                      "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1,
                          master_addr="10.0.0.7", master_port=29511, launcher="torchrun")
    assert env.num_nodes == 2


def test_detect_srun_task_per_gpu():
    env = detect_env({"SLURM_JOB_ID": "1234", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                      "SLURM_NODEID": "2", "SLURM_STEP_NUM_TASKS": "8",
                      "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_NODELIST": "gpu[01-04]",
                      "EVIP_MASTER_ADDR": "10.1.2.3"})
    assert env == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=2, node_rank=2,
                          master_addr="10.1.2.3", master_port=20000 + 1234, launcher="slurm")


def test_batch_shell_without_srun_is_a_single_process():
    # SLURM_NTASKS=2 in a batch shell counts tasks srun never started: waiting for them would hang
    env = detect_env({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.launcher, env.world_size, env.rank, env.master_addr) == ("single", 1, 0, "127.0.0.1")


def test_bad_launcher_variable_is_named():
    from evip.distributed import DistributedError
    with pytest.raises(DistributedError, match="WORLD_SIZE='two'"):
        detect_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_single_process_without_launcher_sets_env_for_deepspeed(tmp_path):
    code = ("import os, torch.distributed as dist, deepspeed\n"
            "from evip.distributed import init_distributed, check_run_dir\n"
            "env = init_distributed()\n"
            "deepspeed.init_distributed()\n"   # fails with "No module named mpi4py" without the env
            "assert dist.get_world_size() == 1 and env.launcher == 'single'\n"
            "assert os.environ['RANK'] == '0' and os.environ['MASTER_ADDR'] == '127.0.0.1'\n"
            f"check_run_dir({str(tmp_path / 'run')!r}, env)\n"
            "print('SINGLE_OK', os.environ['MASTER_PORT'])\n")
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(DS_ACCELERATOR="cpu"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SINGLE_OK" in out.stdout
    assert not (tmp_path / "run" / ".evip-rundir-check").exists()


def test_rendezvous_timeout_names_address_and_what_to_check():
    port = free_port()
    code = ("from evip.distributed import init_distributed\n"
            "init_distributed(timeout_s=3)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=_clean_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2",
                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    assert out.returncode != 0
    assert "DistributedError" in out.stderr
    assert f"127.0.0.1:{port}" in out.stderr and "every rank" in out.stderr


def test_run_dir_not_writable(tmp_path):
    from evip.distributed import RunDirError, check_run_dir
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match=r"a-file/run.*not writable.*--run-dir"):
        check_run_dir(blocker / "run", detect_env({}))


def _agents(run_dirs: list[Path], timeout: int = 180) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents, --nnodes 2 --nproc-per-node 1, c10d rendezvous on 127.0.0.1."""
    port, rdzv_id = free_port(), uuid.uuid4().hex[:8]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
         "--max-restarts", "0", str(SCRIPT), str(d), "60"],
        env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for d in run_dirs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.slow
def test_run_dir_not_shared_between_nodes_fails_on_every_rank(tmp_path):
    # two "nodes" that see different directories at the run-dir path: what /tmp on two hosts is
    results = _agents([tmp_path / "node0" / "run", tmp_path / "node1" / "run"])
    for r in results:
        assert r.returncode != 0
        assert "RunDirError" in r.stderr and "not one shared directory" in r.stderr, r.stderr[-3000:]
        assert "does not see the markers of rank" in r.stderr


def test_one_visible_gpu_per_task_is_cuda0_whatever_the_local_rank(monkeypatch):
    """srun --gpus-per-task=1 shows each task one GPU: LOCAL_RANK 1-7 must not index past it."""
    import torch
    from evip.distributed import DistributedError, backend_and_device, cuda_device_index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [backend_and_device(r) for r in range(8)] == [("nccl", "cuda:0")] * 8
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)   # torchrun: all GPUs visible
    assert [backend_and_device(r)[1] for r in range(8)] == [f"cuda:{r}" for r in range(8)]
    assert cuda_device_index(3, 4) == 3
    with pytest.raises(DistributedError, match="LOCAL_RANK=5 but this process sees 4 GPUs"):
        cuda_device_index(5, 4)
