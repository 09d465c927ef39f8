"""One job per run directory: a lease file, RUN_DIR/lease.json, taken by rank 0 before any write.

    lease = Lease.acquire(run_dir)      # raises RunDirBusy naming the live holder
    ...                                  # a daemon thread renews the heartbeat
    lease.release()

The lease names its holder: host, pid (and the pid's start time, so a reused pid is not mistaken
for the holder), SLURM job id and restart count, start time and heartbeat. Another job:
- refuses (RunDirBusy -> exit code RUN_DIR_BUSY, 73) while the holder is alive, before touching
  anything else in the run dir;
- takes it over, with a log line, when the holder is provably dead: same host and its process is
  gone, or its heartbeat is older than EVIP_LEASE_STALE_S (default 300 s; the holder renews it
  every EVIP_LEASE_HEARTBEAT_S, default 30 s);
- takes it over at once when it is a SLURM requeue of the holder's job (same SLURM_JOB_ID, higher
  SLURM_RESTART_COUNT): SLURM ends a job's processes before it restarts it.
A holder whose lease was taken (it was judged dead, e.g. its node hung longer than the stale
time) notices at its next heartbeat and exits with RUN_DIR_BUSY at once, so two jobs never write.

What it relies on (no flock/fcntl, which NFS and some parallel filesystems do not honour): the
atomic exclusive creation of a name (link(2) of a fully written temp file; open(O_CREAT|O_EXCL)
where hard links are not supported) and atomic rename(2), both atomic on local filesystems, NFSv3+,
Lustre, GPFS, BeeGFS and CephFS; and, for holders on other hosts, clocks in sync to well under the
stale time (NTP). A takeover renames the stale file aside and checks it was the one judged, so
two jobs racing for a dead holder's lease cannot both win.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from evip.exit_codes import RUN_DIR_BUSY

LEASE = "lease.json"


def stale_after_s() -> float:
    return float(os.environ.get("EVIP_LEASE_STALE_S", 300))


def heartbeat_every_s() -> float:
    return float(os.environ.get("EVIP_LEASE_HEARTBEAT_S", 30))


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory."""


def pid_start_time(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux /proc), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                       # exists, another user's
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False           # a zombie: dead, not yet reaped
    except OSError:
        pass
    now = pid_start_time(pid)
    return start is None or now is None or now == start


@dataclass
class Holder:
    token: str
    host: str
    pid: int
    pid_start: int | None
    slurm_job_id: str
    slurm_restart_count: int
    started: float
    heartbeat: float

    @classmethod
    def me(cls) -> "Holder":
        now = time.time()
        return cls(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                   pid_start=pid_start_time(os.getpid()), slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
                   slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT") or 0), started=now, heartbeat=now)

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id} (restart {self.slurm_restart_count})" if self.slurm_job_id else ""
        return (f"pid {self.pid} on {self.host}{job}, started {_when(self.started)}, "
                f"heartbeat {time.time() - self.heartbeat:.0f} s ago")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def judge(holder: Holder, me: Holder, stale_s: float) -> str:
    """Why `holder` may be taken over, or "" when it must be presumed alive."""
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id \
            and me.slurm_restart_count > holder.slurm_restart_count:
        return (f"SLURM requeued job {me.slurm_job_id} (restart {holder.slurm_restart_count} -> "
                f"{me.slurm_restart_count}); the previous run of the job is over")
    if holder.host == me.host and not pid_alive(holder.pid, holder.pid_start):
        return f"its process {holder.pid} on this host ({me.host}) is gone"
    age = time.time() - holder.heartbeat
    if age > stale_s:
        return f"its heartbeat is {age:.0f} s old (EVIP_LEASE_STALE_S={stale_s:g})"
    return ""


def _read(path: Path) -> Holder | None | str:
    """The holder, None when there is no lease, or "unreadable"."""
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return "unreadable"


def _write_tmp(directory: Path, holder: Holder) -> Path:
    tmp = directory / f".{LEASE}.{holder.token}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(asdict(holder), indent=1))
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _create(path: Path, holder: Holder) -> bool:
    """Create `path` holding `holder` unless it exists (atomic). True if created."""
    tmp = _write_tmp(path.parent, holder)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        try:                                        # no hard links on this filesystem
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
            f.flush()
            os.fsync(f.fileno())
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _break(path: Path, judged: Holder, me: Holder) -> bool:
    """Remove the lease of `judged`; False if it was no longer theirs (someone took it meanwhile)."""
    aside = path.with_name(f".{LEASE}.taken-{me.token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    now = _read(aside)
    if isinstance(now, Holder) and now.token != judged.token:   # a fresh lease: put it back
        try:
            os.link(aside, path)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


class Lease:
    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir, stale_s: float | None = None, heartbeat_s: float | None = None,
                log=print) -> "Lease":
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LEASE
        stale_s = stale_after_s() if stale_s is None else stale_s
        me = Holder.me()
        for _ in range(20):
            if _create(path, me):
                lease = cls(path, me)
                lease._start_heartbeat(heartbeat_every_s() if heartbeat_s is None else heartbeat_s)
                return lease
            holder = _read(path)
            if holder is None:
                continue
            if holder == "unreadable":
                age = time.time() - path.stat().st_mtime if path.exists() else 0.0
                if age <= max(stale_s, 5.0):       # O_EXCL fallback: a holder may be writing it now
                    time.sleep(0.2)
                    continue
                path.unlink(missing_ok=True)
                log(f"[evip] lease: {path} was unreadable for {age:.0f} s; removed it")
                continue
            why = judge(holder, me, stale_s)
            if not why:
                raise RunDirBusy(
                    f"run dir {run_dir} is in use by another job: {holder.describe()} (lease {path}). "
                    f"Two jobs must not write one run dir. Wait for that job to end, or cancel it "
                    f"(scancel / kill {holder.pid} on {holder.host}), or use another --run-dir. If you "
                    f"are sure it is dead, delete {path}; otherwise it is taken over automatically "
                    f"once its heartbeat is {stale_s:g} s old (EVIP_LEASE_STALE_S). Exit code "
                    f"{RUN_DIR_BUSY} (RUN_DIR_BUSY); nothing in the run dir was touched.")
            if _break(path, holder, me):
                log(f"[evip] lease: taking over {path} from {holder.describe()}: {why}")
        raise RunDirBusy(f"could not take the lease {path}: other jobs kept taking it; run one job per run dir")

    def owned(self) -> bool:
        now = _read(self.path)
        return isinstance(now, Holder) and now.token == self.holder.token

    def renew(self) -> bool:
        """Write a new heartbeat; False (and nothing written) if the lease is no longer ours."""
        if not self.owned():
            return False
        self.holder.heartbeat = time.time()
        os.replace(_write_tmp(self.path.parent, self.holder), self.path)
        return True

    def _start_heartbeat(self, every_s: float) -> None:
        def beat():
            while not self._stop.wait(every_s):
                try:
                    ok = self.renew()
                except OSError as e:      # storage trouble: try again at the next beat
                    print(f"[evip] lease: could not renew {self.path}: {e}", file=sys.stderr, flush=True)
                    continue
                if not ok and not self._stop.is_set():
                    print(f"[evip] lease: {self.path} was taken over by another job (this one was judged "
                          f"dead); stopping at once so that two jobs never write one run dir "
                          f"(exit {RUN_DIR_BUSY})", file=sys.stderr, flush=True)
                    os._exit(RUN_DIR_BUSY)
        self._thread = threading.Thread(target=beat, name="evip-lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)


def hold_run_dir(run_dir, rank: int) -> Lease | None:
    """Rank 0 takes the lease; every rank raises RunDirBusy if it could not (collective when a
    process group exists). Returns the lease on rank 0, None elsewhere."""
    import torch.distributed as dist

    from evip.distributed import RunDirError

    lease, refusal = None, None
    if rank == 0:
        try:
            lease = Lease.acquire(run_dir)
        except RunDirBusy as e:
            refusal = ("busy", str(e))
        except OSError as e:               # every rank must hear of it, or the others wait forever
            refusal = ("io", f"run dir {run_dir}: cannot create its lease ({e.strerror or e}): pass --run-dir "
                             f"on a filesystem this job can write (permissions, quota, mounted on every node)")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal:
        raise (RunDirBusy if refusal[0] == "busy" else RunDirError)(refusal[1])
    return lease
