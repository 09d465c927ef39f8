"""`evip run PIPELINE --run-dir DIR [key=value ...]`: run the stages in order; rerun to continue.

Exit codes (evip/exit_codes.py): 0 done; 2 config error; 73 another job holds the run dir (nothing
touched); 74 a checkpoint write failed (disk full)
or no checkpoint is intact; 75 preempted (checkpoint written, rerun
the same command); 76 too many non-finite steps (checkpoint written, inspect first); 78 a source's
bad samples passed data.max_bad_fraction (the source, reasons and worst shards named; the last
checkpoint intact); 1 other errors.
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("run", help="run (or continue) a pipeline of stages in a run directory")
    p.add_argument("pipeline", help="pipeline YAML (e.g. stages/pipeline_internlm2.yaml)")
    # nargs="+": overrides may also follow the directory (`evip run P --run-dir D k=v`)
    p.add_argument("--run-dir", required=True, nargs="+", metavar="DIR [KEY=VALUE ...]",
                   help="run directory; an existing one is continued")
    p.add_argument("overrides", nargs="*", help="key=value: seed=1, base.source=..., <stage>.optim.lr=..., "
                                                "stages_all.zero_stage=2")
    p.set_defaults(func=main)


def main(args) -> int:
    from evip import exit_codes
    from evip.pipeline import load_pipeline, run_pipeline
    from evip.data.accounting import TooManyBadSamples
    from evip.signals import Preempted, TooManyNonFinite
    from evip.checkpoint import CheckpointDamaged, CheckpointWriteError
    from evip.lease import RunDirBusy

    from evip.pipeline import check_pipeline
    run_dir, overrides = args.run_dir[0], [*args.overrides, *args.run_dir[1:]]
    lp = load_pipeline(args.pipeline, overrides)   # config errors surface before any heavy work
    check_pipeline(lp)
    try:
        run_pipeline(lp, run_dir)
    except Preempted as e:
        print(f"evip run: preempted: {e}", file=sys.stderr, flush=True)
        return exit_codes.PREEMPTED
    except TooManyNonFinite as e:
        print(f"evip run: stopped: {e}", file=sys.stderr, flush=True)
        return exit_codes.NON_FINITE
    except RunDirBusy as e:
        print(f"evip run: refused: {e}", file=sys.stderr, flush=True)
        return exit_codes.RUN_DIR_BUSY
    except (CheckpointWriteError, CheckpointDamaged) as e:
        print(f"evip run: checkpoint storage: {e}", file=sys.stderr, flush=True)
        return exit_codes.CHECKPOINT_IO
    except TooManyBadSamples as e:
        print(f"evip run: stopped on bad data: {e}", file=sys.stderr, flush=True)
        return exit_codes.BAD_DATA
    return exit_codes.OK
