"""Stop a job that keeps restarting without making progress (SLURM requeue loops).

The batch script calls `python -m evip.restart_guard RUN_DIR --max-restarts N` before every
start. Progress is read from the run dir itself: the contents of every checkpoint pointer
(`.../ckpt/latest`) and every finished-stage marker (`.../DONE`). If they are unchanged since the
previous start, the start counts as a restart without progress; more than N of them in a row and
the guard refuses with exit code NO_PROGRESS (77). Any change resets the count. The history is
kept in RUN_DIR/launch/restarts.json (delete it to reset the count by hand).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from evip.exit_codes import NO_PROGRESS

STATE = Path("launch") / "restarts.json"
POINTERS = ("latest", "DONE")


def progress_marker(run_dir: Path) -> tuple[str, str]:
    """(digest, human summary) of the checkpoint pointers and stage-end markers under run_dir."""
    items = []
    for name in POINTERS:
        for p in sorted(run_dir.rglob(name)):
            if p.is_file():
                rel = p.relative_to(run_dir).as_posix()
                items.append(f"{rel}={p.read_text(errors='replace').strip()[:200]}")
    summary = ", ".join(items) if items else "no checkpoint yet"
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16], summary


def unfinished_stages(run_dir: str | os.PathLike) -> list[str]:
    """Stages of the run's pipeline (RUN_DIR/pipeline.yaml, written by `evip run`) without their
    DONE marker (RUN_DIR/stages/<index>_<name>/DONE). A launcher uses it to tell a finished run from
    tasks that ended with status 0 because they were killed (srun reports 0 for a cancelled step)."""
    from omegaconf import OmegaConf
    run_dir = Path(run_dir)
    if not (run_dir / "pipeline.yaml").is_file():
        return ["(no pipeline.yaml: evip run never started here)"]
    stages = OmegaConf.load(run_dir / "pipeline.yaml").get("stages") or []
    return [f"{i}_{s['name']}" for i, s in enumerate(stages)
            if not (run_dir / "stages" / f"{i}_{s['name']}" / "DONE").is_file()]


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def check(run_dir: str | os.PathLike, max_restarts: int, job: str = "") -> tuple[bool, str]:
    """Record this start; (allowed, message)."""
    run_dir = Path(run_dir)
    path = run_dir / STATE
    digest, summary = progress_marker(run_dir)
    state = json.loads(path.read_text()) if path.exists() else None
    if state is None:
        state = {"marker": digest, "without_progress": 0, "since": time.time(), "starts": []}
    elif state["marker"] != digest:
        state.update(marker=digest, without_progress=0, since=time.time())
    else:
        state["without_progress"] += 1
    state["starts"] = (state["starts"] + [{"time": time.time(), "job": job, "progress": summary,
                                           "without_progress": state["without_progress"]}])[-50:]
    _save(path, state)
    n = state["without_progress"]
    if n > max_restarts:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state["since"]))
        return False, (
            f"evip: restarted {n} times in a row without progress (limit EVIP_MAX_RESTARTS="
            f"{max_restarts}): the checkpoints in {run_dir} are unchanged since {since} "
            f"({summary}). Refusing to start again (exit code {NO_PROGRESS}, NO_PROGRESS). The "
            f"cause is in the log of the previous attempts; fix it, then resubmit (delete "
            f"{path} to reset the count).")
    return True, (f"evip: start {len(state['starts'])} recorded; {n} restart(s) without progress "
                  f"so far (limit {max_restarts}); progress: {summary}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evip.restart_guard", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--max-restarts", type=int, default=int(os.environ.get("EVIP_MAX_RESTARTS", 3)))
    parser.add_argument("--job", default=os.environ.get("SLURM_JOB_ID", ""))
    parser.add_argument("--finished", action="store_true",
                        help="only check that every stage of the run is DONE (exit 0) or not (exit 1)")
    args = parser.parse_args(argv)
    if args.finished:
        left = unfinished_stages(args.run_dir)
        if left:
            print(f"evip: run {args.run_dir} is not finished: {', '.join(left)}", file=sys.stderr, flush=True)
        return 1 if left else 0
    ok, message = check(args.run_dir, args.max_restarts, args.job)
    print(message, file=sys.stderr if not ok else sys.stdout, flush=True)
    return 0 if ok else NO_PROGRESS


if __name__ == "__main__":
    sys.exit(main())
