"""Inference from a run directory: its latest weights, its tokenizer, and prompts built exactly as
the training samples were (shared by `evip generate` and `evip export`).

    w = latest_weights("runs/demo")                  # RunWeights: file, stage, stage in progress
    model = w.build()                                # MonoInternVL, fp32, on the CPU
    tok = run_tokenizer("runs/demo")
    prompt = PromptBuilder(w, tok).build("What colour is the square?", [png_bytes])
    ids = model.generate(prompt.input_ids, prompt.pixel_values, eos_token_id=prompt.stop_id)

Which weights (the run-dir layout is evip/pipeline.py's, the stage directory evip/checkpoint.py's):
the consolidated `model.safetensors` of the last stage with a DONE marker; `--stage NAME` picks a
finished stage by name, or `base` for the untrained base weights. The trainer consolidates
weights only at stage end, so a stage in progress has none yet: it is reported (`in_progress`),
never silently read from its DeepSpeed checkpoint.

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

BASE = "base"


class InferenceError(RuntimeError):
    """A run directory, stage or input that cannot be used; the message names the cause and fix."""


@dataclass
class RunWeights:
    run_dir: Path
    weights: Path                  # a consolidated fp32 model.safetensors
    stage: str                     # "base" or the stage directory name (<index>_<name>)
    stage_dir: Optional[Path]      # None for the base weights
    in_progress: Optional[str]     # the stage directory name of a started, unfinished stage
    model_cfg: object              # evip.model.config.ModelConfig

    def build(self):
        """A MonoInternVL with every parameter read (fp32) from `weights`."""
        return ckpt.build_from_weights(self.model_cfg, self.weights)


def stage_dirs(run_dir: Path) -> list[Path]:
    """stages/<index>_<name>/ directories of a run, in pipeline order."""
    root = run_dir / "stages"
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.split("_", 1)[0].isdigit()] if root.is_dir() else []
    return sorted(dirs, key=lambda p: int(p.name.split("_", 1)[0]))


def stage_name(stage_dir: Path) -> str:
    return stage_dir.name.split("_", 1)[1]


def _progress(stage_dir: Path) -> str:
    try:
        latest = ckpt.latest_checkpoint(stage_dir / "ckpt")
    except RuntimeError:
        latest = None
    if latest is None:
        return f"{stage_dir.name} (no checkpoint yet)"
    return f"{stage_dir.name} (latest checkpoint: step {ckpt.read_meta(latest)['counters']['step']})"


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
    dirs = stage_dirs(run_dir)
    done = [d for d in dirs if (d / ckpt.DONE).is_file()]
    unfinished = [d for d in dirs if not (d / ckpt.DONE).is_file()]
    in_progress = unfinished[0].name if unfinished else None
    if stage == BASE:
        return RunWeights(run_dir, run_dir / "base" / ckpt.WEIGHTS, BASE, None, in_progress, model_cfg)
    if stage is not None:
        match = [d for d in dirs if stage in (stage_name(d), d.name)]
        if not match:
            known = [stage_name(d) for d in dirs]
            raise InferenceError(f"stage {stage!r} not found in {run_dir}/stages: started stages are {known} "
                                 f"(or '{BASE}' for the base weights)")
        d = match[0]
        if not (d / ckpt.DONE).is_file():
            raise InferenceError(f"stage {d.name} has no finished weights yet: it is in progress, "
                                 f"{_progress(d)}; its consolidated {ckpt.WEIGHTS} is written at stage end. "
                                 "Let it finish, or pick a finished stage with --stage")
        return RunWeights(run_dir, d / ckpt.WEIGHTS, d.name, d, in_progress, model_cfg)
    if not done:
        where = f"stage {_progress(unfinished[0])} is in progress" if unfinished else "no stage has started"
        raise InferenceError(f"{run_dir} has no finished weights yet: {where}; a stage's consolidated "
                             f"{ckpt.WEIGHTS} is written at its end. Let it finish, or pass --stage {BASE} "
                             "for the untrained base weights")
    d = done[-1]
    return RunWeights(run_dir, d / ckpt.WEIGHTS, d.name, d, in_progress, model_cfg)


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

        sample_cfg = self._stage_sample_config(weights) or SampleConfig()
        cfg = weights.model_cfg
        # chat template (the stage may train captions), no filters, room for any prompt
        sample_cfg = dataclasses.replace(sample_cfg, template="", filters=FilterConfig(),
                                         max_length=cfg.max_position_embeddings)
        self.builder = SampleBuilder(sample_cfg, tokenizer, cfg)
        self.max_len = cfg.max_position_embeddings
        im_end = tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None
        self.stop_id = im_end if im_end is not None else tokenizer.eos_token_id

    @staticmethod
    def _stage_sample_config(weights: RunWeights):
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
