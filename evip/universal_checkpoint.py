"""A checkpoint written by N ranks, loadable under any other world size: DeepSpeed's universal
format (`deepspeed.checkpoint.ds_to_universal`), made once beside the checkpoint's own files as
`step_N/universal` (rank 0 converts, the others wait: evip/rank0_work.py)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from evip import checkpoint as ckpt
from evip.atomic_files import fsync_dir


def to_universal(path: Path, wait_s: float = 7200.0) -> Path:
    """Convert `path/ds` to DeepSpeed's universal format in `path/universal` once (rank 0; the
    others wait up to `wait_s`, evip/rank0_work.py): a checkpoint written by N ranks then loads
    under any world size, optimizer included."""
    from evip.rank0_work import on_rank0

    out = path / ckpt.UNIVERSAL

    def convert() -> None:
        if not out.is_dir():
            _convert_to_universal(path, out)
    on_rank0(f"convert {path} to a universal checkpoint", convert, wait_s)
    return out


def _convert_to_universal(path: Path, out: Path) -> None:
    import subprocess
    import sys

    tmp = path / f".{ckpt.UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / ckpt.DS_TAG),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"converting {path} to a universal checkpoint for a new world size failed:\n"
                           f"{res.stderr[-2000:]}\nResume with the world size that wrote it "
                           f"({ckpt.read_meta(path)['world_size']} ranks) instead.")
    os.replace(tmp, out)
    fsync_dir(path)
