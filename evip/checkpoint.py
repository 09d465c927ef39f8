"""Crash-safe checkpoints of one stage that prove themselves (the weights a stage hands on:
evip/stage_weights.py; conversion for another world size: evip/universal_checkpoint.py).

Layout of a stage directory:

    ckpt/step_00000040/ds/...          engine.save_checkpoint(tag="ds"): module, optimizer, scheduler
                                       (DeepSpeed's own files: torch pickles, see the README)
    ckpt/step_00000040/rank{R}.json    rank R's data-loader state and RNG states (JSON, with
    ckpt/step_00000040/rank{R}.safetensors   its arrays in safetensors: evip/state_files.py)
    ckpt/step_00000040/meta.json       counters, world size, and the size + sha256 of every other
                                       file of the checkpoint (the manifest); written last
    ckpt/latest                        the name of the newest complete checkpoint (written last)
    ckpt/damaged-step_*                checkpoints that failed verification, kept for inspection
    model.safetensors                  consolidated fp32 weights at stage end
    DONE                               written after model.safetensors: the stage is finished

A checkpoint is written into `ckpt/.tmp-step_N`; once every rank has written its part, the ranks
hash the files (each a share), rank 0 writes meta.json with the manifest, renames the directory to
`ckpt/step_N`, and only then replaces `latest` (write temp + fsync + os.replace + fsync of the
directory). A process killed at any instant leaves `latest` naming a complete checkpoint; stale
`.tmp-*` directories are removed at the next start.

On resume (`resumable_checkpoint`) the checkpoint `latest` names is verified against its manifest
(every file's size and sha256, the ranks sharing the reading); a damaged one (torn or truncated
file, flipped bit, missing file, unreadable meta.json) is reported, renamed `damaged-step_N`, and
the newest intact one is used instead and named in `latest`. If checkpoints exist but none is
intact the run stops (`CheckpointDamaged`) instead of silently restarting the stage.
A write that fails (disk full: ENOSPC, quota, I/O error) on any rank stops every rank with
`CheckpointWriteError` naming the file and the intact checkpoint to resume from.
"""
from __future__ import annotations

import errno
import hashlib
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

from evip.atomic_files import fsync_dir, write_atomic
from evip.stage_weights import DONE, WEIGHTS
from evip.state_files import read_state, write_state

LATEST = "latest"
META = "meta.json"
DS_TAG = "ds"
DAMAGED = "damaged-"
HASH_CHUNK = 8 << 20
UNIVERSAL = "universal"   # step_N/universal: loadable under any world size (evip/universal_checkpoint.py)


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed on some rank (disk full, quota, I/O error); the previous one is intact."""


class CheckpointDamaged(RuntimeError):
    """Checkpoints exist but none passes verification."""


@dataclass
class Counters:
    step: int = 0              # optimizer steps taken (applied or skipped) in this stage
    tokens: int = 0            # global tokens trained on (all ranks)
    samples: int = 0           # global samples
    nonfinite: int = 0         # consecutive non-finite steps
    skipped: int = 0           # total skipped steps


def step_name(step: int) -> str:
    return f"step_{step:08d}"


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


# ---- collectives (no-ops for a lone process) --------------------------------------------------

def _multi() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather(obj) -> list:
    if not _multi():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    if not _multi():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- this rank's own state: data loader + RNG ------------------------------------------------

def rank_state_name(rank: int) -> str:
    return f"rank{rank}"


def save_rank_state(directory: Path, rank: int, loader) -> list[Path]:
    return write_state({"loader": loader.state_dict(), "rng": rng_state()}, directory, rank_state_name(rank))


def read_rank_state(path: Path, rank: int) -> dict:
    if (path / f"{rank_state_name(rank)}.json").is_file():
        return read_state(path, rank_state_name(rank))
    # checkpoints written before evip stored its state as JSON: a torch pickle of evip's own making
    return torch.load(path / f"rank{rank}.pt", weights_only=False)


def restore_rank_state(path: Path, loader, rank: int, world_size: int, saved_ws: int) -> None:
    """This rank's loader position and RNG states from checkpoint `path`. Same world size: its own.
    Another world size: the loader gets the states of ALL old ranks and derives its position from
    them (no sample repeated or lost); the RNG of old rank `rank` if there was one."""
    if saved_ws == world_size:
        state = read_rank_state(path, rank)
        loader.load_state_dict(state["loader"])
    else:
        states = [read_rank_state(path, r) for r in range(saved_ws)]
        loader.load_state_dict([s["loader"] for s in states])
        state = states[rank] if rank < saved_ws else None
    if state is not None:
        set_rng_state(state["rng"])


# ---- the manifest: size and sha256 of every file -------------------------------------------

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files_of(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != META)


def manifest(directory: Path, rank: int, world_size: int) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under `directory` but meta.json (collective:
    rank r hashes the files r, r + world_size, ...; every rank gets the whole manifest)."""
    names = _from_rank0(_files_of(directory) if rank == 0 else None)
    mine = {n: {"size": (directory / n).stat().st_size, "sha256": sha256_of(directory / n)}
            for n in names[rank::world_size]}
    out: dict[str, dict] = {}
    for part in _gather(mine):
        out.update(part)
    return dict(sorted(out.items()))


def _check_share(path: Path, rank: int, world_size: int) -> list[str]:
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return [f"{META} unreadable ({type(e).__name__}: {e})"]
    files = meta.get("files")
    if files is None:
        return []          # written before checkpoints had a manifest: nothing to verify against
    problems = []
    for name in sorted(files)[rank::world_size]:
        want, f = files[name], path / name
        try:
            size = f.stat().st_size
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if size != want["size"]:
            problems.append(f"{name} has {size} bytes, the manifest says {want['size']} (truncated or torn write)")
        elif sha256_of(f) != want["sha256"]:
            problems.append(f"{name} has the right size but another sha256 (corrupted bytes)")
    return problems


def verify(path: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Problems found in checkpoint `path` (empty: intact). Collective: each rank reads a share."""
    problems = []
    for part in _gather(_check_share(path, rank, world_size)):
        problems += part
    return sorted(set(problems))


# ---- which checkpoint to resume from ---------------------------------------------------------

def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names, or None (no verification; see `resumable_checkpoint`). A
    pointer to a missing or incomplete directory is an error."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = ckpt_root / name
    if not (path / META).is_file():
        raise RuntimeError(f"{pointer} names {name}, which is missing or incomplete (no {META}); "
                           f"point it at a complete step_* directory in {ckpt_root} or delete it to restart the stage")
    return path


def _candidates(ckpt_root: Path) -> tuple[list[str], str]:
    """Names to try in order (what `latest` names, then every step_* directory, newest first) and
    a note on the pointer itself when it is unusable."""
    note, first = "", []
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            name, note = "", f"{pointer} is unreadable ({e})"
        if name.startswith("step_") and "/" not in name:
            first = [name]
        elif not note:
            note = f"{pointer} holds {name[:40]!r}, not a checkpoint name (torn or overwritten)"
    steps = sorted((p.name for p in ckpt_root.glob("step_*") if p.is_dir()), reverse=True)
    return first + [n for n in steps if n not in first], note


def resumable_checkpoint(ckpt_root: Path, rank: int = 0, world_size: int = 1) -> Path | None:
    """The checkpoint to resume from, verified (collective): `latest`'s if intact, else the newest
    intact one, each damaged one reported and renamed `damaged-<name>`; None when there is none
    at all (a fresh stage). Raises CheckpointDamaged when some exist but none is intact."""
    names, note = _from_rank0(_candidates(ckpt_root) if rank == 0 and ckpt_root.is_dir() else ([], ""))
    if rank == 0 and note:
        print(f"[evip] checkpoint: {note}", flush=True)
    rejected = []
    for i, name in enumerate(names):
        path = ckpt_root / name
        problems = verify(path, rank, world_size) if (path / META).is_file() else [f"no {META} (incomplete)"]
        if not problems:
            if rank == 0 and (i > 0 or note):
                write_atomic(ckpt_root / LATEST, name + "\n")
                print(f"[evip] checkpoint: resuming from {path} instead, the newest intact one; "
                      f"{ckpt_root / LATEST} now names it", flush=True)
            _barrier()
            return path
        rejected.append(name)
        if rank == 0:
            kept = _quarantine(path)
            print(f"[evip] checkpoint: {path} is damaged and will not be used: {'; '.join(problems[:5])}"
                  f"{f' (+{len(problems) - 5} more)' if len(problems) > 5 else ''}. Kept as {kept} for "
                  f"inspection (delete it when done).", flush=True)
        _barrier()
    if rejected:
        raise CheckpointDamaged(
            f"no intact checkpoint in {ckpt_root}: {', '.join(rejected)} failed verification (kept as "
            f"{DAMAGED}*, see the log above). The stage cannot resume; to restart it from its start, "
            f"move {ckpt_root} away and rerun.")
    return None


def _quarantine(path: Path) -> Path:
    target = path.with_name(DAMAGED + path.name)
    if target.exists():
        target = path.with_name(f"{DAMAGED}{path.name}-{int(time.time())}")
    os.replace(path, target)
    fsync_dir(path.parent)
    return target


def clean_partial(ckpt_root: Path, rank: int) -> None:
    """Remove what a process killed mid-write left (rank 0 only): `.tmp-*` checkpoint directories
    and the stage's half-written weights or DONE (`.model.safetensors.tmp`, `.DONE.tmp`)."""
    if rank == 0 and ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
    if rank == 0:
        for name in (WEIGHTS, DONE):
            ckpt_root.parent.joinpath(f".{name}.tmp").unlink(missing_ok=True)
    _barrier()


# ---- writing one -----------------------------------------------------------------------------

def _inject_enospc(directory: Path, rank: int) -> None:
    """faults.enospc_step: this rank's state file is cut short and the write fails as on a full disk."""
    with open(directory / f"{rank_state_name(rank)}.json", "w") as f:
        f.write('{"state": {"loa')
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: faults.enospc_step)",
                  str(directory / f"{rank_state_name(rank)}.json"))


def save(engine, ckpt_root: Path, counters: Counters, loader, rank: int, world_size: int,
         keep_last: int, extra: dict | None = None, hold_open_s: float = 0.0, enospc: bool = False) -> Path:
    """Write a checkpoint of every rank (collective) and publish it; returns its directory.
    `hold_open_s` (an injected fault, `faults.checkpoint_sleep_*`): rank 0 waits that long with
    the engine state on disk and nothing published, so a test can kill the run mid-write.
    `enospc` (`faults.enospc_step`): rank 0's own state file fails as on a full disk."""
    name = step_name(counters.step)
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    failure = None
    try:
        if enospc and rank == 0:
            _inject_enospc(tmp, rank)
        save_rank_state(tmp, rank, loader)
    except OSError as e:
        failure = f"rank {rank}: {e.strerror or e} writing {e.filename or tmp}"
    failures = [f for f in _gather(failure) if f]
    if failures:
        previous = (ckpt_root / LATEST).read_text().strip() if (ckpt_root / LATEST).is_file() else None
        raise CheckpointWriteError(
            errno.ENOSPC if "No space" in failures[0] else errno.EIO,
            f"writing checkpoint {name} in {ckpt_root} failed ({'; '.join(failures)}). Nothing was "
            f"published: {f'the last complete checkpoint is {previous}' if previous else 'the stage has no checkpoint yet'}. "
            f"Free space (or fix the filesystem) and rerun the same command to resume from it.")
    files = manifest(tmp, rank, world_size)
    if rank == 0:
        if hold_open_s:
            print(f"[fault] faults.checkpoint_sleep_s: holding the write of {name} open for {hold_open_s}s",
                  flush=True)
            time.sleep(hold_open_s)
        meta = {"counters": asdict(counters), "world_size": world_size, "time": time.time(), **(extra or {}),
                "files": files}
        write_atomic(tmp / META, json.dumps(meta, indent=1))
        if final.exists():   # a re-save of the same step (e.g. stage end right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
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
    """Restore engine, loader and RNG state, and the counters from `path` (verified beforehand by
    `resumable_checkpoint`). Another world size: the engine was built with `load_universal`
    (see `to_universal`) and the loader derives its position from every old rank's state."""
    meta = read_meta(path)
    saved_ws = int(meta["world_size"])
    tag = DS_TAG if saved_ws == world_size else UNIVERSAL
    load_path, _ = engine.load_checkpoint(str(path), tag=tag, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed loaded nothing from {path}/{tag}: the checkpoint is damaged; "
                           f"delete {path} and point {path.parent / LATEST} at the previous one")
    restore_rank_state(path, loader, rank, world_size, saved_ws)
    return Counters(**meta["counters"])
