"""Time to restore the data loader from a state taken at step 10 vs one taken at step 10000.

Restoring is O(1) in the step: the state is a position (epoch, unit, offset per source, mixture
draw count); the reader seeks there, nothing is replayed. Measured: build_loader +
load_state_dict + the first batch after restore, median of REPEATS (alternating, after a
warm-up), for 0 and 2 worker processes.
Data: generated img2dataset-style shards (real PNG images, captions), a 2-source mixture,
the real SmolLM2 tokenizer. Last line: one JSON object.

    .venv/bin/python bench/data_restore.py [--steps 10000] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from data_stream_helpers import (data_config, make_shards, model_config_for, real_tokenizer,  # noqa: E402
                                 write_recipe)
from evip.data.loader import build_loader  # noqa: E402

REPEATS = 5


def restore_once(cfg, tok, mc, state) -> float:
    t = time.perf_counter()
    loader = build_loader(cfg, tok, mc, 0, 1)
    loader.load_state_dict(state)
    it = iter(loader)
    next(it)
    dt = time.perf_counter() - t
    del it, loader
    return dt


def restore_seconds(cfg, tok, mc, a, b) -> tuple[float, float]:
    """Medians for states a and b, measured alternately after one warm-up of each."""
    restore_once(cfg, tok, mc, a), restore_once(cfg, tok, mc, b)
    ta, tb = [], []
    for _ in range(REPEATS):
        ta.append(restore_once(cfg, tok, mc, a))
        tb.append(restore_once(cfg, tok, mc, b))
    return statistics.median(ta), statistics.median(tb)


def restore_ratio(steps: int, workdir: str = "") -> dict:
    """Per worker count (0, 2): the restore times of states taken at step 10 and at `steps`
    and their ratio; progress lines on stdout."""
    d = Path(workdir or tempfile.mkdtemp(prefix="evip-restore-"))
    make_shards(d, "a", 16, 200)
    make_shards(d, "b", 4, 100)
    recipe = write_recipe(d / "r.yaml", [{"name": "a", "paths": [str(d / "a-*.tar")], "weight": 3.0},
                                         {"name": "b", "paths": [str(d / "b-*.tar")], "weight": 1.0}])
    tok = real_tokenizer()
    mc = model_config_for(tok)
    result = {"steps": steps}
    for workers in (0, 2):
        # small packs (1 row of 48 tokens: 1-2 samples per step) keep reaching step 10000 quick
        cfg = data_config(recipe, num_workers=workers, rows=1, token_budget=48)
        loader = build_loader(cfg, tok, mc, 0, 1)
        it = iter(loader)
        states = {}
        t = time.perf_counter()
        for step in range(1, steps + 1):
            next(it)
            if step in (10, steps):
                states[step] = loader.state_dict()
        run_s = time.perf_counter() - t
        del it, loader
        epochs = [s["stream"]["sources"][0]["epoch"] for s in states[steps]["slots"].values()]
        t10, tn = restore_seconds(cfg, tok, mc, states[10], states[steps])
        print(f"workers={workers}: {steps} steps in {run_s:.1f} s (source a at epoch {max(epochs)}); "
              f"restore at step 10: {t10 * 1000:.0f} ms, at step {steps}: {tn * 1000:.0f} ms, "
              f"state {len(json.dumps(states[steps], default=str))} bytes", flush=True)
        result[f"workers{workers}"] = {"restore_s_step10": round(t10, 4), f"restore_s_step{steps}": round(tn, 4),
                                       "ratio_step10_over_stepN": round(t10 / tn, 3)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    print(json.dumps({"bench": "data_restore", **restore_ratio(args.steps, args.workdir)}))


if __name__ == "__main__":
    main()
