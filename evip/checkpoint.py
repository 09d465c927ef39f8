"""Crash-safe checkpoints of one stage, and the consolidated weights a stage hands on.

Layout of a stage directory:

    ckpt/step_00000040/ds/...          engine.save_checkpoint(tag="ds"): module, optimizer, scheduler
    ckpt/step_00000040/rank{R}.pt      rank R's data-loader state and RNG states
    ckpt/step_00000040/meta.json       counters (step, tokens, samples, non-finite), world size; last
    ckpt/latest                        the name of the newest complete checkpoint (written last)
    model.safetensors                  consolidated fp32 weights at stage end
    DONE                               written after model.safetensors: the stage is finished

A checkpoint is written into `ckpt/.tmp-step_N`, renamed to `ckpt/step_N` once every rank has
written its part, and only then is `latest` replaced (write temp + fsync + os.replace + fsync of
the directory). A process killed at any instant leaves `latest` naming a complete checkpoint;
stale `.tmp-*` directories are removed at the next start.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
META = "meta.json"
DS_TAG = "ds"


@dataclass
class Counters:
    step: int = 0              # optimizer steps taken (applied or skipped) in this stage
    tokens: int = 0            # global tokens trained on (all ranks)
    samples: int = 0           # global samples
    nonfinite: int = 0         # consecutive non-finite steps
    skipped: int = 0           # total skipped steps


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()      # this rank's current device
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names, or None. A pointer to a missing or incomplete directory is an
    error (it can only come from tampering: `latest` is written after the directory is complete)."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = ckpt_root / name
    if not (path / META).is_file():
        raise RuntimeError(f"{pointer} names {name}, which is missing or incomplete (no {META}); "
                           f"point it at a complete step_* directory in {ckpt_root} or delete it to restart the stage")
    return path


def clean_partial(ckpt_root: Path, rank: int) -> None:
    """Remove `.tmp-*` directories left by a process killed mid-write (rank 0 only)."""
    if rank == 0 and ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
    _barrier()


def save(engine, ckpt_root: Path, counters: Counters, loader, rank: int, world_size: int,
         keep_last: int, extra: dict | None = None, hold_open_s: float = 0.0) -> Path:
    """Write a checkpoint of every rank (collective) and publish it; returns its directory.
    `hold_open_s` (an injected fault, `faults.checkpoint_sleep_*`): rank 0 waits that long with
    the engine state on disk and nothing published, so a test can kill the run mid-write."""
    name = step_name(counters.step)
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    torch.save({"loader": loader.state_dict(), "rng": rng_state()}, tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        if hold_open_s:
            print(f"[fault] faults.checkpoint_sleep_s: holding the write of {name} open for {hold_open_s}s",
                  flush=True)
            time.sleep(hold_open_s)
        meta = {"counters": asdict(counters), "world_size": world_size, "time": time.time(), **(extra or {})}
        write_atomic(tmp / META, json.dumps(meta, indent=1))
        if final.exists():   # a re-save of the same step (e.g. stage end right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        write_atomic(ckpt_root / LATEST, name + "\n")
        prune(ckpt_root, keep_last)
    _barrier()
    return final


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (never the one `latest` names)."""
    latest = (ckpt_root / LATEST).read_text().strip()
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / META).is_file())
    for p in done[:-keep_last]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def load(engine, path: Path, loader, rank: int, world_size: int) -> Counters:
    """Restore engine, loader and RNG state, and the counters from `path`.

    Same world size: this rank's own loader and RNG state. Another world size (the engine was built
    with `load_universal`, see `to_universal`): the loader gets the states of ALL old ranks and
    derives its position from them (no sample repeated or lost); RNG of old rank `rank` if any."""
    meta = read_meta(path)
    saved_ws = int(meta["world_size"])
    tag = DS_TAG if saved_ws == world_size else UNIVERSAL
    load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed loaded nothing from {path}/{tag}: the checkpoint is damaged; "
                           f"delete {path} and point {path.parent / LATEST} at the previous one")
    if saved_ws == world_size:
        state = torch.load(path / f"rank{rank}.pt", weights_only=False)
        loader.load_state_dict(state["loader"])
    else:
        states = [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(saved_ws)]
        loader.load_state_dict([s["loader"] for s in states])
        state = states[rank] if rank < saved_ws else None
    if state is not None:
        set_rng_state(state["rng"])
    return Counters(**meta["counters"])


UNIVERSAL = "universal"


def to_universal(path: Path, rank: int) -> Path:
    """Convert `path/ds` to DeepSpeed's universal format in `path/universal` once (rank 0; others
    wait): a checkpoint written by N ranks then loads under any world size, optimizer included."""
    import subprocess
    import sys

    out = path / UNIVERSAL
    if rank == 0 and not out.is_dir():
        tmp = path / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path / DS_TAG),
               "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"converting {path} to a universal checkpoint for a new world size failed:\n"
                               f"{res.stderr[-2000:]}\nResume with the world size that wrote it "
                               f"({read_meta(path)['world_size']} ranks) instead.")
        os.replace(tmp, out)
        _fsync_dir(path)
    _barrier()
    return out


# ---- stage hand-off: consolidated fp32 weights ---------------------------------------------

WEIGHTS = "model.safetensors"
DONE = "DONE"


def build_from_weights(model_cfg, path: Path):
    """A fresh MonoInternVL whose every parameter is read (fp32) from the safetensors file `path`."""
    from safetensors import safe_open

    from evip.model.meta_load import build_empty, materialize

    model = build_empty(model_cfg)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())

        def produce(name, shape):
            if name not in keys:
                raise KeyError(f"{path} has no tensor {name!r}: it was written for another model config")
            return f.get_tensor(name)
        materialize(model, produce, torch.float32, lambda name: str(path))
    return model


def restore_fp32_masters(engine, weights: Path) -> int:
    """Under bf16 DeepSpeed makes its fp32 master weights from the bf16-cast module, which would
    round every trained parameter at each stage start; set them from the fp32 file instead
    (collective under ZeRO-3). Returns how many were set."""
    from safetensors import safe_open
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    n = 0
    with safe_open(str(weights), framework="pt") as f:
        for name, p in engine.module.named_parameters():
            if p.requires_grad and safe_get_full_fp32_param(p) is not None:
                safe_set_full_fp32_param(p, f.get_tensor(name).float().to(engine.device))
                n += 1
    return n


def consolidated_state(engine, start_weights: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """fp32 weights of the whole model at this instant (collective under ZeRO-3); rank 0 gets them.

    Trained parameters come from DeepSpeed's fp32 master copy (`safe_get_full_fp32_param`, exact
    under bf16 and every ZeRO stage); frozen ones are read back from the stage's input weights,
    which `verify_frozen` proves they still equal."""
    from safetensors import safe_open
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    frozen = []
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            frozen.append(name)
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:   # ZeRO-0 fp32: the module holds the master weights itself
            full = p.detach()
        if rank == 0:
            out[name] = full.detach().float().cpu().clone()
    if rank != 0:
        return None
    with safe_open(str(start_weights), framework="pt") as f:
        for name in frozen:
            out[name] = f.get_tensor(name).float()
    return out


def write_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors, published atomically (temp file + fsync + rename)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
