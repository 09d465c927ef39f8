"""The tiny pipeline (stages/pipeline_tiny.yaml) as the launch tests run it through `evip run`:
real demo shards (`evip demo-data`), a real word-level HF tokenizer written to disk, ZeRO-2 fp32,
a periodic checkpoint every 2 steps, 8 steps in s1_3_alignment (4 in the others). `reference_losses` is one uninterrupted 2-rank run made by
two torchrun agents (--nnodes 2, c10d on loopback), shared by every test of the session."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "stages/pipeline_tiny.yaml"


def _word_tokenizer(data: Path, out: Path) -> int:
    """Write an HF tokenizer over the demo chats' words (with the chat, image and grounding tokens
    already in its vocabulary); return the <IMG_CONTEXT> id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from evip.model.tokens import IM_END, IM_START, IMG_CONTEXT, SPECIAL_TOKENS
    words: set[str] = set()
    for line in (data / "s2" / "chats.jsonl").read_text().splitlines():
        for turn in json.loads(line)["conversations"]:
            words |= set(re.findall(r"\w+|[^\w\s]", turn["value"]))
    specials = ["[PAD]", "[UNK]", "</s>", IM_START, IM_END, *SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate(specials + sorted(words - set(specials)))}
    assert len(vocab) <= 128, f"{len(vocab)} words: more than the tiny model's vocab_size 128"
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="</s>").save_pretrained(out)
    return vocab[IMG_CONTEXT]


def tiny_inputs(base: Path) -> tuple[dict[str, str], list[str]]:
    """(extra environment, overrides) of the tiny pipeline; data written once under `base`."""
    data, tok = base / "demo-data", base / "tokenizer"
    if not (base / "ids.json").exists():
        subprocess.run([sys.executable, "-m", "evip.cli", "demo-data", str(data), "--image-size", "56",
                        "--n-s1-1", "64", "--n-s1-2", "32", "--n-s1-3", "32", "--n-s2", "32",
                        "--n-heldout", "8", "--samples-per-shard", "16"], check=True, cwd=ROOT,
                       capture_output=True, timeout=300)
        (base / "ids.json").write_text(json.dumps({"img_context": _word_tokenizer(data, tok)}))
    ids = json.loads((base / "ids.json").read_text())
    overrides = ["stages_all.data.recipe=data_recipes/local_tiny.yaml", f"base.tokenizer={tok}",
                 f"model.img_context_token_id={ids['img_context']}", "stages_all.checkpoint.every_steps=2",
                 "stages_all.checkpoint.keep_last=2", "s1_3_alignment.steps=8"]
    return {"EVIP_DEMO_DATA": str(data), "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}, overrides


def train_losses(run_dir: Path) -> list[tuple[str, int, float]]:
    """(stage, step, loss) of every train record; the last record of a step wins (resumes)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out[(r["stage"], r["step"])] = r["loss"]
    return [(s, i, v) for (s, i), v in sorted(out.items())]


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "SBATCH_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT", "EVIP_MASTER_ADDR")}
    env.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra})
    return env


def two_agents(run_dir: Path, env: dict[str, str], overrides: list[str], timeout: float = 600):
    """Two torchrun agents through launch/torchrun.sh (NNODES=2, one process each)."""
    from evip.distributed import free_port
    env = {**env, "NPROC": "1", "NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
           "RDZV_ID": f"ref-{run_dir.name}"}
    procs = [subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), TINY, str(run_dir), *overrides],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def checkpoint_world_sizes(run_dir: Path) -> set[int]:
    return {json.loads(m.read_text())["world_size"] for m in Path(run_dir).glob("stages/*/ckpt/step_*/meta.json")}


def reference_losses(tmp_path_factory) -> tuple[list, dict[str, str], list[str], str, Path]:
    """Losses of an uninterrupted 2-rank run (computed once per session), env, overrides, log, run dir."""
    base = tmp_path_factory.getbasetemp() / "launch-tiny"
    base.mkdir(exist_ok=True)
    env, overrides = tiny_inputs(base)
    run = base / "reference-run"
    if not (base / "reference.json").exists():
        codes, outs = two_agents(run, clean_env(**env), overrides)
        assert codes == [0, 0], "\n".join(o[-4000:] for o in outs)
        (base / "reference.json").write_text(json.dumps(train_losses(run)))
        (base / "reference.log").write_text("\n".join(outs))
    return ([tuple(x) for x in json.loads((base / "reference.json").read_text())], env, overrides,
            (base / "reference.log").read_text(), run)
