"""A pipeline: a base LLM and the stages that turn it into a native MLLM, run in order.

    cfg = load_pipeline("demo/pipeline.yaml", ["s1_1_concept.steps=10", "seed=3"])
    run_pipeline(cfg, "runs/demo")

Run directory:
    pipeline.yaml                 the resolved pipeline config (stage configs in each stage dir)
    base/model.safetensors        the base weights (upcycled LLM, or a seeded random init)
    base/model_config.json        the ModelConfig every stage builds
    stages/<i>_<name>/            checkpoints (evip/checkpoint.py); model.safetensors and DONE
                                  (evip/stage_weights.py)
    metrics.jsonl                 one line per step and per eval (rank 0)
Running again on the same directory skips stages whose DONE exists and resumes the first
unfinished one from its `latest` checkpoint.

Overrides, in the order applied to a stage: the file's `stages_all: [key=v, ...]` (every stage), the
stage's own `overrides`, then the command line's `stages_all.<key>=v` and `<stage name>.<key>=v`.
Other command-line overrides (`seed=1`, `base.source=...`, `model.<field>=...`) go to the pipeline.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import MISSING

from evip import checkpoint as ckpt
from evip import stage_weights
from evip.config import PATH_KEYS, ConfigError, load_config, path_rule_dotlist, to_yaml
from evip.stages import StageConfig, load_stage

ALL_STAGES = "stages_all"


@dataclass
class BaseConfig:
    source: str = "random"        # "random" (seeded init of `model`), an HF model dir, or a .gguf file
    tokenizer: str = ""           # tokenizer dir or .gguf; default: the source's own
    seed: int = 0                 # init of the patch embedding / random weights


@dataclass
class StageRef:
    name: str = MISSING           # the prefix of this stage's command-line overrides
    file: str = MISSING           # relative to the pipeline file
    overrides: list[str] = field(default_factory=list)


@dataclass
class WandbConfig:
    project: str = ""             # empty: offline run in the run dir (WANDB_MODE respected)
    entity: str = ""
    enabled: bool = True


@dataclass
class PipelineConfig:
    name: str = "evip"
    base: BaseConfig = field(default_factory=BaseConfig)
    model: dict[str, Any] = field(default_factory=dict)   # ModelConfig fields (vision fields for an LLM)
    stages: list[StageRef] = field(default_factory=list)
    stages_all: list[str] = field(default_factory=list)   # overrides of every stage, before its own
    seed: int = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # how long the other ranks wait for rank 0's host work (building and writing the base, converting
    # a checkpoint to the universal format, writing a stage's weights), polled outside any collective
    rank0_wait_minutes: float = 120.0


@dataclass
class LoadedPipeline:
    cfg: PipelineConfig
    path: Path
    stages: list[tuple[StageConfig, str]]    # (config, source file) in order


def load_pipeline(path, overrides: Sequence[str] = ()) -> LoadedPipeline:
    path = Path(path)
    names_probe = load_config(PipelineConfig, path, [])
    stage_names = [s.name for s in names_probe.stages]
    own, per_stage = [], {n: [] for n in stage_names}
    for o in overrides:
        head = o.split(".", 1)[0]
        if head == ALL_STAGES:
            for n in stage_names:
                per_stage[n].append(o.split(".", 1)[1])
        elif head in per_stage:
            per_stage[head].append(o.split(".", 1)[1])
        else:
            own.append(o)
    cfg = load_config(PipelineConfig, path, own)
    if not cfg.rank0_wait_minutes > 0:
        raise ConfigError(f"'rank0_wait_minutes' in {path}: must be > 0 (minutes), got {cfg.rank0_wait_minutes}")
    if not cfg.stages:
        raise ConfigError(f"'stages' in {path}: the pipeline lists no stage")
    stages = []
    for i, ref in enumerate(cfg.stages):
        file = (path.parent / ref.file).resolve()
        if not file.is_file():
            raise ConfigError(f"'stages.{i}.file' in {path}: stage file {file} not found")
        # overrides written in the pipeline file: paths relative to it (the path rule, evip/config.py)
        from_file = path_rule_dotlist([*cfg.stages_all, *ref.overrides], PATH_KEYS["StageConfig"],
                                      path.resolve().parent, str(path))
        stage = load_stage(file, [*from_file, *per_stage[ref.name]])
        stages.append((stage, str(file)))
    return LoadedPipeline(cfg, path, stages)


def model_config(cfg: PipelineConfig, where: str):
    from evip.model.config import ModelConfig
    try:
        return ModelConfig(**cfg.model)
    except TypeError as e:
        raise ConfigError(f"'model' in {where}: {e}") from None


# ---- distributed set-up ------------------------------------------------------------------

def init_distributed(run_dir: Path):
    """(rank, world size, lease) from torchrun, SLURM or a lone process; a process group exists
    afterwards (gloo on CPU, nccl on GPU), rank 0 holds the run dir's lease (taken before any
    write; every rank raises evip.lease.RunDirBusy if another job holds it) and the run dir is
    checked writable and shared by every rank."""
    from evip.distributed import check_run_dir
    from evip.distributed import init_distributed as init
    from evip.lease import hold_run_dir

    env = init()
    lease = hold_run_dir(run_dir, env.rank)
    try:
        check_run_dir(run_dir, env)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return env.rank, env.world_size, lease


# ---- the run -----------------------------------------------------------------------------

def stage_dir(run_dir: Path, index: int, stage: StageConfig) -> Path:
    return run_dir / "stages" / f"{index}_{stage.name}"


def random_base_config(lp: LoadedPipeline):
    """(ModelConfig, tokenizer or None) of a random base: the pipeline's model config; with
    base.tokenizer, the vocabulary and special token ids follow that tokenizer."""
    cfg = model_config(lp.cfg, str(lp.path))
    if not lp.cfg.base.tokenizer:
        return cfg, None
    from evip.model.tokens import IMG_CONTEXT, load_tokenizer as load
    tok = load(lp.cfg.base.tokenizer)
    return dataclasses.replace(cfg, vocab_size=len(tok), img_context_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT),
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0), tok


def base_source(lp: LoadedPipeline) -> Path:
    """base.source of a pretrained base, checked to exist."""
    path = Path(lp.cfg.base.source)
    if not path.exists():
        raise ConfigError(f"'base.source' in {lp.path}: {path} does not exist (an HF model directory, a .gguf "
                          f"file, or 'random')")
    return path


def prepare_base(lp: LoadedPipeline, run_dir: Path):
    """Materialise base/model.safetensors + model_config.json once (rank 0, the others wait:
    evip/rank0_work.py); return the ModelConfig."""
    from evip.model.config import ModelConfig
    from evip.rank0_work import on_rank0

    base_dir = run_dir / "base"
    cfg_file = base_dir / "model_config.json"

    def build() -> None:
        if (base_dir / stage_weights.WEIGHTS).is_file():
            return
        base_dir.mkdir(parents=True, exist_ok=True)
        b = lp.cfg.base
        if b.source == "random":
            from evip.model.mono import MonoInternVL
            mcfg, tok = random_base_config(lp)
            torch.manual_seed(b.seed)
            model = MonoInternVL(mcfg)
        else:
            from evip.model.weights import load_pretrained_llm
            model, tok = load_pretrained_llm(base_source(lp), vision=lp.cfg.model, seed=b.seed,
                                             tokenizer=b.tokenizer or None)
        if tok is not None:
            tok.save_pretrained(str(base_dir / "tokenizer"))
        cfg_file.write_text(json.dumps(dataclasses.asdict(model.cfg), indent=1))
        stage_weights.write_weights({n: p.detach().float() for n, p in model.named_parameters()},
                                    base_dir / stage_weights.WEIGHTS)
    on_rank0("build and write the base weights", build, 60 * lp.cfg.rank0_wait_minutes)
    return ModelConfig(**json.loads(cfg_file.read_text()))


def load_tokenizer(run_dir: Path, lp: LoadedPipeline):
    from evip.model.tokens import load_tokenizer as load
    saved = run_dir / "base" / "tokenizer"
    if saved.is_dir():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(saved))
    if lp.cfg.base.tokenizer:
        return load(lp.cfg.base.tokenizer)
    return None


def default_loader_factory(stage: StageConfig, source: str, tokenizer, model_cfg, rank: int,
                           world_size: int, seed: int) -> Callable[[], Any]:
    from evip.data.loader import build_loader
    return lambda: build_loader(stage.data, tokenizer, model_cfg, rank, world_size)


LoaderFactory = Callable[..., Callable[[], Any]]


def run_pipeline(lp: LoadedPipeline, run_dir, loader_factory: Optional[LoaderFactory] = None,
                 on_engine=None, metrics_enabled: bool = True) -> list[ckpt.Counters]:
    """Run every unfinished stage in order (collective); returns each run stage's counters.
    Rank 0 holds the run dir's lease (evip/lease.py) from before the first write to the end."""
    run_dir = Path(run_dir)
    rank, world_size, lease = init_distributed(run_dir)
    try:
        return _run_stages(lp, run_dir, rank, world_size, loader_factory, on_engine, metrics_enabled)
    finally:
        if lease is not None:
            lease.release()


def _run_stages(lp: LoadedPipeline, run_dir: Path, rank: int, world_size: int,
                loader_factory: Optional[LoaderFactory], on_engine, metrics_enabled: bool) -> list[ckpt.Counters]:
    from evip.evals import Evaluator
    from evip.metrics import Metrics
    from evip.signals import StopRequest
    from evip.trainer import StageContext, StageTrainer

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "pipeline.yaml").write_text(to_yaml(lp.cfg))
    model_cfg = prepare_base(lp, run_dir)
    check_pipeline(lp, model_cfg, check_data=loader_factory is None)
    tokenizer = load_tokenizer(run_dir, lp)
    factory = loader_factory or default_loader_factory
    metrics = Metrics(run_dir, rank, model_cfg, lp.cfg.wandb, lp.cfg.name) if metrics_enabled else None
    results = []
    previous = run_dir / "base" / stage_weights.WEIGHTS
    try:
        with StopRequest() as stop:
            for i, (stage, source) in enumerate(lp.stages):
                sdir = stage_dir(run_dir, i, stage)
                if (sdir / stage_weights.DONE).is_file():
                    previous = sdir / stage_weights.WEIGHTS
                    continue
                if rank == 0:
                    sdir.mkdir(parents=True, exist_ok=True)
                    (sdir / "stage.yaml").write_text(to_yaml(stage))
                if dist.is_available() and dist.is_initialized():
                    dist.barrier()
                ctx = StageContext(stage=stage, source=source, index=i, stage_dir=sdir, input_weights=previous,
                                   model_cfg=model_cfg, rank=rank, world_size=world_size, seed=lp.cfg.seed,
                                   make_loader=factory(stage, source, tokenizer, model_cfg, rank, world_size,
                                                       lp.cfg.seed),
                                   stop=stop, metrics=metrics, on_engine=on_engine,
                                   rank0_wait_s=60 * lp.cfg.rank0_wait_minutes,
                                   evaluator=Evaluator(tokenizer, model_cfg, rank, world_size, metrics,
                                                       run_dir, factory, lp.cfg.seed))
                trainer = StageTrainer(ctx)
                results.append(trainer.run())
                trainer.close()
                previous = sdir / stage_weights.WEIGHTS
    finally:
        if metrics is not None:
            metrics.close()
    return results


# ---- checks before any heavy work -----------------------------------------------------------

def planned_model_config(lp: LoadedPipeline):
    """The ModelConfig the pipeline will build, from config files only (no weights read).
    For a pretrained LLM the vocabulary grows by the image/grounding tokens it lacks (<= 9)."""
    from evip.model.tokens import SPECIAL_TOKENS
    b, where = lp.cfg.base, str(lp.path)
    if b.source == "random":
        return random_base_config(lp)[0]
    from evip.model.hf_config import model_config_from_hf
    path = base_source(lp)
    if path.suffix == ".gguf":
        from transformers import AutoConfig
        hf = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    else:
        from evip.model.hf_import import read_hf_config
        hf = read_hf_config(path)
    cfg = model_config_from_hf(hf, lp.cfg.model, where)
    return dataclasses.replace(cfg, vocab_size=cfg.vocab_size + len(SPECIAL_TOKENS))


def check_pipeline(lp: LoadedPipeline, model_cfg=None, check_data: bool = True) -> dict:
    """Every stage's trainable groups against the real parameter names (model on the meta device)
    and its data recipe; raises ConfigError naming the key and file. Returns {stage: trained groups}."""
    from evip.data.recipe import load_recipe
    from evip.model.meta_load import build_empty
    from evip.stages import apply_trainable

    model = build_empty(model_cfg or planned_model_config(lp))
    out = {}
    for i, (stage, source) in enumerate(lp.stages):
        out[stage.name] = apply_trainable(model, stage, source)
        if not check_data:
            continue
        if not Path(stage.data.recipe).is_file():
            raise ConfigError(f"'data.recipe' in {source} (stage {stage.name}): recipe file {stage.data.recipe} "
                              f"not found; set {stage.name}.data.recipe=PATH")
        load_recipe(stage.data.recipe, stage.data.recipe_overrides)
    return out
