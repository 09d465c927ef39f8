"""The model a stage trains is materialised in the stage's precision on its training device
(evip.trainer.build_placement), tensor by tensor from the fp32 hand-off file: a bf16 stage on a
GPU never holds the model in host RAM; bf16 values are exactly DeepSpeed's cast of the fp32 build
(which it made before), and the fp32 build is the file's values bit for bit.

Memory is measured in a fresh process. safetensors maps the file (its pages are the page cache,
shared by every rank of a node, not a copy per rank), so the check is on anonymous memory (RssAnon:
each rank's own) after the build, and on the peak of all of it (VmHWM).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config

from evip import stage_weights
from evip.model.mono import MonoInternVL
from evip.stages import StageConfig
from evip.trainer import build_placement

CHILD = r"""
import json, sys
import accelerate, torch
sys.path.insert(0, sys.argv[3])
from conftest import tiny_model_config
from evip import stage_weights
from evip.model.meta_load import build_empty
from evip.stages import StageConfig
from evip.trainer import build_placement

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

cfg = tiny_model_config(**json.loads(sys.argv[2]))
build_empty(cfg)                      # one-time costs of a first construction, not the build's
before = {k: status(k) for k in ("VmRSS", "RssAnon")}
model = stage_weights.build_from_weights(cfg, sys.argv[1], *build_placement(StageConfig(name="s", precision="bf16")))
params = list(model.parameters())
print(json.dumps({"peak_above_start": status("VmHWM") - before["VmRSS"],
                  "anon_after": status("RssAnon") - before["RssAnon"],
                  "model_bytes": sum(p.numel() * p.element_size() for p in params),
                  "dtypes": sorted({str(p.dtype) for p in params})}))
"""

# ~99M parameters: 379 MiB in fp32, 190 MiB in bf16, the largest tensor 11 MiB in fp32
MID = dict(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16, num_kv_heads=8,
           head_dim=64)


def _weights(tmp_path: Path, **cfg) -> Path:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MonoInternVL(tiny_model_config(**cfg))
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    path = tmp_path / stage_weights.WEIGHTS
    stage_weights.write_weights({n: p.detach() for n, p in model.named_parameters()}, path)
    return path


def test_placement_follows_the_stage_precision_and_device(monkeypatch):
    assert build_placement(StageConfig(name="s", precision="fp32")) == (torch.float32, torch.device("cpu"))
    assert build_placement(StageConfig(name="s", precision="bf16")) == (torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # the GPU init_distributed chose
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert build_placement(StageConfig(name="s", precision="bf16")) == (torch.bfloat16, torch.device("cuda", 3))


def test_bf16_build_is_deepspeeds_cast_of_the_fp32_build_and_fp32_is_the_file(tmp_path):
    cfg = tiny_model_config()
    path = _weights(tmp_path)
    from safetensors.torch import load_file
    file = load_file(str(path))
    fp32 = dict(stage_weights.build_from_weights(cfg, path, *build_placement(StageConfig(name="s", precision="fp32")))
                .named_parameters())
    bf16 = dict(stage_weights.build_from_weights(cfg, path, *build_placement(StageConfig(name="s", precision="bf16")))
                .named_parameters())
    assert fp32.keys() == bf16.keys() == file.keys()
    for name, t in file.items():
        assert fp32[name].dtype == torch.float32 and torch.equal(fp32[name], t)
        assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], fp32[name].to(torch.bfloat16))


@pytest.mark.slow
def test_bf16_stage_build_holds_no_fp32_model(tmp_path):
    path = _weights(tmp_path, **MID)
    file_bytes = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(MID), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print("MiB:", {k: round(v / 2**20) for k, v in m.items() if k != "dtypes"}, "file", round(file_bytes / 2**20))
    assert m["dtypes"] == ["torch.bfloat16"]
    assert abs(m["model_bytes"] - file_bytes / 2) < 2**20                    # half the fp32 file
    largest = 2816 * 1024 * 4
    # this rank's own memory: the bf16 model (on a GPU: none), no fp32 copy beside it
    assert m["anon_after"] < m["model_bytes"] + 2 * largest + 32 * 2**20, m
    # everything at its peak, the file's mapped pages included: less than an fp32 model plus its bf16 cast
    assert m["peak_above_start"] < file_bytes + m["model_bytes"] + 64 * 2**20, m
