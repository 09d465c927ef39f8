"""Inference from a run directory: its latest weights, its tokenizer, and prompts built exactly as
the training samples were (shared by `evip generate` and `evip export`).

    w = latest_weights("runs/demo")                  # RunWeights: file, stage, stage in progress
    model = w.build()                                # MonoInternVL, fp32, on the CPU
    tok = run_tokenizer("runs/demo")
    prompt = PromptBuilder(w, tok).build("What colour is the square?", [png_bytes])
    ids = model.generate(prompt.input_ids, prompt.pixel_values, eos_token_id=prompt.stop_id)

Which weights (the run-dir layout is evip/pipeline.py's, the stage directory evip/checkpoint.py's):
the newest there are. A stage in progress with a checkpoint: that checkpoint consolidated to fp32
(trained parameters from DeepSpeed's fp32 master copies, frozen ones from the stage's input
weights, as evip.stage_weights.consolidated_state does at stage end; exact). Otherwise the
consolidated `model.safetensors` of the last stage with a DONE marker. `stage=NAME` picks a stage
by name the same way, `stage="base"` the untrained base weights.

The prompt is the stage's own chat sample (evip/data/sample.py: same template, system prompt,
image tiling) for the one-turn conversation {human: prompt, gpt: ""}, cut before the first trained
token, so it ends with "<|im_start|>assistant\\n" exactly as in training.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from evip import checkpoint as ckpt
from evip import stage_weights

BASE = "base"


class InferenceError(RuntimeError):
    """A run directory, stage or input that cannot be used; the message names the cause and fix."""


@dataclass
class RunWeights:
    run_dir: Path
    source: Path                   # a consolidated fp32 model.safetensors, or a checkpoint directory
    stage: str                     # "base" or the stage directory name (<index>_<name>)
    stage_dir: Optional[Path]      # None for the base weights
    in_progress: Optional[str]     # the stage directory name of a started, unfinished stage
    model_cfg: object              # evip.model.config.ModelConfig
    step: Optional[int] = None     # the checkpoint's step when `source` is a checkpoint
    input_weights: Optional[Path] = None   # a checkpoint's stage input (its frozen parameters)

    def describe(self) -> str:
        if self.step is None:
            return f"{self.stage} ({self.source})"
        return f"{self.stage} in progress, checkpoint step {self.step} ({self.source})"

    def build(self):
        """A MonoInternVL with every parameter in fp32 from `source`."""
        if self.step is None:
            return stage_weights.build_from_weights(self.model_cfg, self.source)
        from evip.model.meta_load import build_empty, materialize
        state = checkpoint_state(self.source, self.stage_dir, self.input_weights)
        model = build_empty(self.model_cfg)

        def produce(name, shape):
            if name not in state:
                raise InferenceError(f"checkpoint {self.source} has no tensor {name!r}: it was written for "
                                     "another model config")
            return state.pop(name)
        return materialize(model, produce, torch.float32, lambda name: str(self.source))


def checkpoint_state(path: Path, stage_dir: Path, input_weights: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a stage checkpoint (`ckpt/step_N`): trained parameters from the fp32 master
    copies of its ZeRO-1/2/3 optimizer states (or the fp32 module under ZeRO-0), frozen ones from the
    stage's input weights, which the trainer keeps bit-identical."""
    from safetensors import safe_open

    from evip.config import load_config
    from evip.stages import StageConfig

    stage = load_config(StageConfig, stage_dir / "stage.yaml")
    ds = path / ckpt.DS_TAG
    if stage.zero_stage == 0:   # refused with bf16: the module holds the fp32 weights
        files = sorted(ds.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise InferenceError(f"{ds} has no mp_rank_*_model_states.pt: the checkpoint is damaged")
        state = {k: v.float() for k, v in torch.load(files[0], map_location="cpu", weights_only=False)["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(
            str(path), tag=ckpt.DS_TAG, exclude_frozen_parameters=True).items()}
    with safe_open(str(input_weights), framework="pt") as f:
        for name in f.keys():
            if name not in state:
                state[name] = f.get_tensor(name).float()
    return state


def stage_dirs(run_dir: Path) -> list[Path]:
    """stages/<index>_<name>/ directories of a run, in pipeline order."""
    root = run_dir / "stages"
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.split("_", 1)[0].isdigit()] if root.is_dir() else []
    return sorted(dirs, key=lambda p: int(p.name.split("_", 1)[0]))


def stage_name(stage_dir: Path) -> str:
    return stage_dir.name.split("_", 1)[1]


def _latest(stage_dir: Path) -> Optional[Path]:
    try:
        return ckpt.latest_checkpoint(stage_dir / "ckpt")
    except RuntimeError as e:   # `latest` names a missing directory (tampering)
        raise InferenceError(str(e)) from None


def _model_config(run_dir: Path):
    from evip.model.config import ModelConfig
    cfg_file = run_dir / "base" / "model_config.json"
    if not cfg_file.is_file():
        raise InferenceError(f"{cfg_file} not found: {run_dir} is not a run directory of `evip run` "
                             "(or its base weights were never written)")
    return ModelConfig(**json.loads(cfg_file.read_text()))


def latest_weights(run_dir: str | Path, stage: Optional[str] = None) -> RunWeights:
    """The weights to use (see the module docstring); InferenceError naming the cause otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InferenceError(f"run directory {run_dir} does not exist")
    model_cfg = _model_config(run_dir)
    base = run_dir / "base" / stage_weights.WEIGHTS
    dirs = stage_dirs(run_dir)
    unfinished = [d for d in dirs if not (d / stage_weights.DONE).is_file()]
    in_progress = unfinished[0].name if unfinished else None
    if stage == BASE:
        return RunWeights(run_dir, base, BASE, None, in_progress, model_cfg)
    if stage is not None:
        match = [d for d in dirs if stage in (stage_name(d), d.name)]
        if not match:
            known = [stage_name(d) for d in dirs]
            raise InferenceError(f"stage {stage!r} not found in {run_dir}/stages: started stages are {known} "
                                 f"(or '{BASE}' for the base weights)")
        candidates = [match[0]]
    else:
        candidates = dirs[::-1]
    for d in candidates:
        if (d / stage_weights.DONE).is_file():
            return RunWeights(run_dir, d / stage_weights.WEIGHTS, d.name, d, in_progress, model_cfg)
        latest = _latest(d)
        if latest is not None:
            k = dirs.index(d)
            inputs = dirs[k - 1] / stage_weights.WEIGHTS if k else base
            return RunWeights(run_dir, latest, d.name, d, in_progress, model_cfg,
                              step=int(ckpt.read_meta(latest)["counters"]["step"]), input_weights=inputs)
    if stage is not None:
        raise InferenceError(f"stage {candidates[0].name} has no weights yet: it is in progress and has "
                             "written no checkpoint; wait for its first checkpoint or pick another --stage")
    where = f"stage {in_progress} is in progress and has written no checkpoint" if in_progress else \
        "no stage has started"
    raise InferenceError(f"{run_dir} has no trained weights yet: {where}. Wait for a checkpoint, or pass "
                         f"--stage {BASE} for the untrained base weights")


def run_tokenizer(run_dir: str | Path):
    """The tokenizer the run trained with (evip.pipeline.load_tokenizer: base/tokenizer, else
    pipeline.yaml's base.tokenizer); InferenceError when the run has none."""
    from evip.config import load_config
    from evip.pipeline import LoadedPipeline, PipelineConfig, load_tokenizer

    run_dir = Path(run_dir)
    pipe_file = run_dir / "pipeline.yaml"
    cfg = load_config(PipelineConfig, pipe_file) if pipe_file.is_file() else PipelineConfig()
    tok = load_tokenizer(run_dir, LoadedPipeline(cfg, pipe_file, []))
    if tok is None:
        raise InferenceError(f"{run_dir} has no tokenizer: neither {run_dir / 'base' / 'tokenizer'} nor "
                             f"'base.tokenizer' in {pipe_file}; a pipeline on a random base needs "
                             "base.tokenizer set to produce text")
    return tok


def stage_sample_config(weights: RunWeights):
    """`data.sample` of the weights' stage (the base: of the first stage), None if not found."""
    from evip.config import load_config
    from evip.stages import StageConfig

    d = weights.stage_dir
    if d is None:
        dirs = stage_dirs(weights.run_dir)
        d = dirs[0] if dirs else None
    if d is None or not (d / "stage.yaml").is_file():
        return None
    return load_config(StageConfig, d / "stage.yaml").data.sample


@dataclass
class Prompt:
    input_ids: torch.Tensor        # [1, T]
    pixel_values: Optional[torch.Tensor]   # uint8 [n_tiles, 3, S, S] or None (text only)
    stop_id: Optional[int]         # <|im_end|> (the end of an assistant turn), else eos


class PromptBuilder:
    """One-turn chat prompts built by the training SampleBuilder of `weights`' stage."""

    def __init__(self, weights: RunWeights, tokenizer):
        from evip.data.filters import FilterConfig
        from evip.data.sample import SampleBuilder, SampleConfig
        from evip.model.tokens import IM_END

        sample_cfg = stage_sample_config(weights) or SampleConfig()
        cfg = weights.model_cfg
        # chat template (the stage may train captions), no filters, room for any prompt
        sample_cfg = dataclasses.replace(sample_cfg, template="", filters=FilterConfig(),
                                         max_length=cfg.max_position_embeddings)
        self.builder = SampleBuilder(sample_cfg, tokenizer, cfg)
        self.max_len = cfg.max_position_embeddings
        im_end = tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None
        self.stop_id = im_end if im_end is not None else tokenizer.eos_token_id

    def build(self, text: str, images: Sequence[bytes] = (), image_names: Sequence[str] = ()) -> Prompt:
        from evip.batch import IGNORE_INDEX
        from evip.data.images import open_header
        from evip.data.record import BadSample, Record

        names = list(image_names) or [f"image {i}" for i in range(len(images))]
        for data, name in zip(images, names):   # name the unreadable file before the builder sees it
            try:
                open_header(data, self.builder.cfg.image.bomb_pixels)
            except BadSample as e:
                raise InferenceError(f"image {name} cannot be read as an image: {e}") from None
        rec = Record(key="prompt", source="generate", shard="command line", kind="chat", images=list(images),
                     conversations=[{"from": "human", "value": text}, {"from": "gpt", "value": ""}])
        try:
            sample = self.builder(rec)
        except BadSample as e:
            raise InferenceError(f"the prompt cannot be built: {e}") from None
        first_trained = int((sample.labels != IGNORE_INDEX).nonzero()[0])
        ids = sample.input_ids[:first_trained][None]
        pixels = sample.pixel_values if sample.pixel_values.shape[0] else None
        return Prompt(ids, pixels, self.stop_id)


def read_images(paths: Sequence[str | Path]) -> list[bytes]:
    """Encoded bytes of each file; InferenceError naming a missing or unreadable one."""
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InferenceError(f"image {p} not found")
        try:
            out.append(p.read_bytes())
        except OSError as e:
            raise InferenceError(f"image {p} cannot be read: {e}") from None
    return out
