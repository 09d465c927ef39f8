"""The demo pipeline for real, shortened: the real SmolLM2-135M-Instruct upcycled, the demo data,
all four EViP stages through `evip run`, then `evip report --heldout`, `evip generate` and
`evip export`.

Asserts the paper's claim the demo exists to show: with the LLM frozen (S1.1, S1.2) the text-only
loss on a real corpus is bit-identical to the base LLM's while the caption loss falls; S1.3 and S2
unfreeze the LLM and move it. Slow (minutes on 2 CPU cores): marked `slow`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evip.report import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["s1_1_concept.steps=4", "s1_2_semantic.steps=4", "s1_3_alignment.steps=2", "s2_instruct.steps=2",
         "stages_all.data.token_budget=160", "stages_all.data.sample.max_length=160",
         "stages_all.data.num_workers=0", "stages_all.eval.text_batches=1", "stages_all.eval.text_seq_len=64"]


@pytest.mark.slow
def test_demo_pipeline_short(tmp_path, smollm2_dir):
    data, run = tmp_path / "data", tmp_path / "run"
    # a lone process: drop what an in-process run earlier in this session left for DeepSpeed
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC_")},
           "EVIP_DEMO_DATA": str(data)}
    cli = [sys.executable, "-m", "evip.cli"]

    def call(*args):
        proc = subprocess.run([*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, f"evip {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout

    call("demo-data", str(data), "--n-s1-1", "200", "--n-s1-2", "100", "--n-s1-3", "60", "--n-s2", "60",
         "--n-heldout", "12")
    call("run", "demo/pipeline.yaml", f"base.source={smollm2_dir}", *SHORT, "--run-dir", str(run))
    out = call("report", str(run), "--heldout", str(data / "heldout" / "questions.json"))

    stages = {s.name: s for s in read_metrics(run / "metrics.jsonl")}
    assert list(stages) == ["s1_1_concept", "s1_2_semantic", "s1_3_alignment", "s2_instruct"]
    base = json.loads((run / "eval_base.json").read_text())["text_loss"]
    final_text = {n: [e["text_loss"] for e in s.evals if "text_loss" in e][-1] for n, s in stages.items()}
    # frozen LLM: bit-identical text-only loss through S1.1 and S1.2 ...
    assert final_text["s1_1_concept"] == base and final_text["s1_2_semantic"] == base
    # ... and the LLM moves once attention (S1.3) and everything (S2) train
    assert final_text["s2_instruct"] != base
    # the visual side learned: caption loss fell over the frozen-LLM stages
    _, cap = stages["s1_1_concept"].series("loss_caption")
    _, cap2 = stages["s1_2_semantic"].series("loss_caption")
    assert cap2[-1] < cap[0], (cap, cap2)
    acc = json.loads((run / "accuracy.json").read_text())
    assert acc["n"] == 12 and 0 <= acc["accuracy"] <= 1 and 0 < acc["chance"] < 1
    summary = (run / "report" / "summary.md").read_text()
    assert summary.count("(identical)") >= 2 and "Held-out accuracy" in summary
    assert "held-out accuracy" in out
    for name in ("loss", "forgetting", "throughput", "data_wait"):
        assert (run / "report" / f"{name}.png").stat().st_size > 10_000

    # the final model answers from its latest weights, deterministically ...
    image = sorted((data / "heldout" / "images").glob("*.png"))[0]
    ask = ("generate", "--run-dir", str(run), "--image", str(image), "--prompt", "Describe the image.",
           "--max-new-tokens", "8")
    answer = call(*ask)
    assert answer.strip() and call(*ask) == answer
    # ... and exports to the Mono-InternVL-2B layout, which reloads with the run's final weights
    from safetensors.torch import load_file

    from evip.model.weights import load_mono2b

    call("export", str(run), str(tmp_path / "export"), "--dtype", "fp32")
    model, _ = load_mono2b(tmp_path / "export")
    final = load_file(run / "stages" / "3_s2_instruct" / "model.safetensors")
    exported = model.state_dict()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    # SmolLM2 ties its head: InternLM2-VE holds it as a copy of the embedding
    assert set(exported) == set(final) | {"output.weight"}
    assert torch.equal(exported["output.weight"], final["tok_embeddings.weight"])
