"""bench/gpu_check.sh --dry-run: every part of the one-shot GPU check that does not need CUDA runs
on CPU at tiny sizes (kernels vs the SDPA reference, a DeepSpeed stage step with its FLOPs and
plan estimate, generation with and without the KV cache, routed vs plain), so the script is ready
when a GPU is lent. CUDA-only figures (varlen, flex backward, MFU, peak memory, host syncs) are null."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    res = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["dry_run"] and out["errors"] == {} and out["backend"] == "gloo"
    k = out["kernels"]
    assert k["auto_picks"] == "sdpa" and set(k["max_abs_error"]) == {"sdpa", "flex"}
    assert k["max_abs_error"]["flex"]["out"] < 1e-5
    s = out["stage_step"]
    assert s["tokens_per_step"] > 0 and s["tokens_per_s"] > 0 and s["plan_estimate_gb"] > 0 and s["mfu"] is None
    assert s["generate"]["same_leading_tokens"] == "4/4"
    assert out["routed"]["routed_over_plain"] > 0
    partial = [json.loads(line.split("gpu_check partial: ", 1)[1]) for line in res.stderr.splitlines()
               if line.startswith("gpu_check partial: ")]
    assert [set(p) & {"kernels", "stage_step", "routed"} for p in partial] == \
        [{"kernels"}, {"kernels", "stage_step"}, {"kernels", "stage_step", "routed"}]
