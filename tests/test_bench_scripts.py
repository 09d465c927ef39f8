"""Every benchmark in bench/ runs end to end on tiny sizes and prints its one-JSON last line with the
figures the README quotes. Not a timing test: it keeps `make bench` from rotting when the code it
measures changes (the figures themselves come from full-size runs)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "stage_cost.py": (["--rounds", "3", "--hidden", "128", "--layers", "1", "--seq-len", "128", "--vocab", "1024"],
                      ["s1_1_over_s2_step_time", "s1_1_over_s2_peak_memory", "zero0_over_bare_pytorch"]),
    "attention_memory.py": (["--lengths", "256", "--samples", "2", "--flex", "eager", "--head-lengths", "128",
                             "--vocab", "1000", "--hidden", "64"],
                            ["attention.256.flex_over_mask_time", "head_loss.128.chunked_over_logits_time"]),
    "model_step.py": (["--hidden", "128", "--ffn", "256", "--layers", "1", "--tokens", "2048", "--reps", "1",
                       "--vocab", "1024"], ["routed_over_plain", "routed_over_dense"]),
    "data_restore.py": (["--steps", "30"], ["workers0.ratio_step10_over_stepN", "workers2.ratio_step10_over_stepN"]),
    "resize_fidelity.py": (["--tile", "56"], ["photos.mean_abs_levels", "noise.share_differing"]),
    "data_throughput.py": (["--rounds", "1", "--max-tiles", "1", "--resize", "torch", "--restore-steps", "20"],
                           ["per_worker.0.pipeline_over_decode", "per_worker.0.ms_per_sample.bound_over_decode",
                            "restore.workers2.ratio_step10_over_stepN"]),
}


def lookup(obj, dotted: str):
    for key in dotted.split("."):
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    return obj


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_script_prints_its_figures(script, tmp_path):
    args, figures = CASES[script]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WANDB_MODE"] = "disabled"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    for name in figures:
        value = lookup(last, name)
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
