"""A stage's typed config and its trainable set.

    stage = load_stage("stages/s1_1_concept.yaml", ["optim.lr=1e-4"])
    trainable = apply_trainable(model, stage, source="stages/s1_1_concept.yaml")

A stage names the parameter groups it trains (evip.model.groups: patch_embed, visual_ffn,
visual_attn, attention, text_ffn, norms, embeddings, head). Everything else is frozen before the
engine exists: DeepSpeed silently ignores `requires_grad` flipped on a live engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from omegaconf import MISSING
from torch import nn

from evip.config import ConfigError, load_config
from evip.data.loader import DataConfig

ALL = "all"   # shorthand in `trainable`: every group


@dataclass
class OptimConfig:
    """torch AdamW, passed to DeepSpeed (no JIT build; resume is bit-exact)."""
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01


@dataclass
class ScheduleConfig:
    kind: str = "cosine"            # cosine | constant (both after a linear warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0       # of the stage's steps; used when warmup_steps == 0
    min_lr_ratio: float = 0.0       # cosine floor, as a fraction of optim.lr


@dataclass
class CheckpointConfig:
    every_steps: int = 0            # 0: off
    every_minutes: float = 0.0      # 0: off
    keep_last: int = 2
    keep_after_stage: bool = True   # False: drop the stage's checkpoints once its consolidated
                                    # weights and DONE are written (a finished stage never resumes)
    at_stage_end: bool = True       # False: no checkpoint of the last step (a kill before DONE
                                    # reruns the stage from its last periodic checkpoint, or from its
                                    # start: the same steps, the same weights; only time is lost)


@dataclass
class EvalConfig:
    every_steps: int = 0            # 0: only at the stage's end
    heldout_data: Optional[DataConfig] = None   # held-out captions (same batches each eval); None: off
    heldout_batches: int = 2
    text_corpus: str = "pydoc"      # "pydoc" (CPython's pydoc_data.topics), a .txt path, or "" (off)
    text_batches: int = 2
    text_seq_len: int = 128
    caption_images: list[str] = field(default_factory=list)     # image files for greedy captions
    caption_prompt: str = ""
    caption_max_new_tokens: int = 16


@dataclass
class FaultConfig:
    """Faults to inject, for tests of the recovery paths; all off by default. Not saved with a
    checkpoint: a resumed run injects them only if its own config sets them again."""
    nonfinite_steps: list[int] = field(default_factory=list)   # 0-based steps whose loss is made NaN
    signal_after_step: int = -1       # >= 0: rank 0 sends itself a real SIGUSR1 after this 0-based step
    checkpoint_sleep_step: int = -1   # >= 0: rank 0 holds the write of this step's checkpoint open
    checkpoint_sleep_s: float = 0.0   # for this long, after the engine state is on disk, before publishing
    enospc_step: int = -1             # >= 0: rank 0's write of this step's checkpoint fails with ENOSPC
                                      # (its state file cut short), as on a full disk


@dataclass
class StageConfig:
    name: str = MISSING
    trainable: list[str] = field(default_factory=list)    # group names, or ["all"]
    data: DataConfig = field(default_factory=DataConfig)   # recipe, token budget, tiles (evip/data/loader.py)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps: int = 0                  # optimizer steps; or
    tokens: int = 0                 # stop once this many (global) tokens were trained on
    grad_accum: int = 1
    clip_grad: float = 1.0          # 0: off
    zero_stage: int = 1             # 0 | 1 | 2 | 3
    precision: str = "bf16"         # bf16 | fp32
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log_every: int = 1
    max_nonfinite: int = 3          # consecutive non-finite steps before stopping
    faults: FaultConfig = field(default_factory=FaultConfig)   # tests of the recovery paths only


def load_stage(path, overrides: Sequence[str] = ()) -> StageConfig:
    cfg = load_config(StageConfig, path, overrides)
    validate_stage(cfg, str(path))
    return cfg


def validate_stage(cfg: StageConfig, where: str) -> None:
    """Checks that need no model; each error names the key and `where`."""
    def bad(key: str, msg: str):
        raise ConfigError(f"'{key}' in {where}: {msg}")

    if not cfg.trainable:
        bad("trainable", "no parameter group to train: list groups (or 'all')")
    if (cfg.steps > 0) == (cfg.tokens > 0):
        bad("steps", f"set exactly one of steps / tokens to a positive value (got steps={cfg.steps}, "
                     f"tokens={cfg.tokens})")
    if cfg.zero_stage not in (0, 1, 2, 3):
        bad("zero_stage", f"must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.precision not in ("bf16", "fp32"):
        bad("precision", f"must be bf16 or fp32, got {cfg.precision!r}")
    if cfg.zero_stage == 0 and cfg.precision == "bf16":
        bad("zero_stage", "ZeRO-0 with bf16 trains bf16 weights without reachable fp32 master weights "
                          "(DeepSpeed's DDP-bf16 path): the stage hand-off would round every trained weight; "
                          "use zero_stage=1 (the paper's setting) or precision=fp32")
    if cfg.schedule.kind not in ("cosine", "constant"):
        bad("schedule.kind", f"must be cosine or constant, got {cfg.schedule.kind!r}")
    if cfg.grad_accum < 1:
        bad("grad_accum", f"must be >= 1, got {cfg.grad_accum}")
    if len(cfg.optim.betas) != 2:
        bad("optim.betas", f"needs two values, got {cfg.optim.betas}")
    if cfg.checkpoint.keep_last < 1:
        bad("checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    if cfg.max_nonfinite < 1:
        bad("max_nonfinite", f"must be >= 1, got {cfg.max_nonfinite}")


def group_names() -> tuple[str, ...]:
    from evip.model.groups import GROUPS
    return tuple(GROUPS)


def resolve_groups(cfg: StageConfig, where: str) -> list[str]:
    known = group_names()
    if ALL in cfg.trainable:
        return list(known)
    for i, g in enumerate(cfg.trainable):
        if g not in known:
            raise ConfigError(f"'trainable.{i}' in {where}: unknown parameter group {g!r}; "
                              f"use one of {list(known)} or 'all'")
    return list(dict.fromkeys(cfg.trainable))


def params_by_group(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    from evip.model.groups import named_groups
    return {g: list(ps) for g, ps in named_groups(model).items()}


def apply_trainable(model: nn.Module, cfg: StageConfig, where: str) -> dict[str, list[str]]:
    """Set requires_grad by the stage's groups (before any engine exists).

    Returns {group: [parameter names]} of what is trained. A named group that matches no parameter
    of this model, or a stage that ends up training nothing, is a ConfigError naming the key.
    """
    groups = resolve_groups(cfg, where)
    by_group = params_by_group(model)
    explicit = ALL not in cfg.trainable
    for i, g in enumerate(groups):
        if explicit and not by_group.get(g):
            raise ConfigError(f"'trainable.{i}' in {where}: group {g!r} matches no parameter of this "
                              f"model (e.g. visual_attn needs model.visual_attention_experts=true); "
                              f"remove it or change the model")
    trained: dict[str, list[str]] = {}
    for g, named in by_group.items():
        on = g in groups
        for name, p in named:
            p.requires_grad_(on)
        if on and named:
            trained[g] = [n for n, _ in named]
    if not any(trained.values()):
        raise ConfigError(f"'trainable' in {where}: the stage trains no parameter of this model")
    return trained


def frozen_digest(module: nn.Module) -> dict[str, str]:
    """sha256 of every frozen parameter's bytes (collective under ZeRO-3: gathers each one)."""
    import hashlib

    import torch

    gather = _gatherer(module)
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        with gather(p):
            t = p.detach().cpu().contiguous()
            raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            out[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


def _gatherer(module: nn.Module):
    import contextlib

    if any(hasattr(p, "ds_id") for p in module.parameters()):
        import deepspeed
        return lambda p: deepspeed.zero.GatheredParameters([p], modifier_rank=None)
    return lambda p: contextlib.nullcontext()


class FrozenParameterChanged(RuntimeError):
    pass


def verify_frozen(before: dict[str, str], after: dict[str, str], stage: str) -> None:
    changed = [n for n in before if before[n] != after.get(n)]
    if changed:
        raise FrozenParameterChanged(
            f"stage {stage!r}: frozen parameter {changed[0]!r} changed during the stage "
            f"({len(changed)} changed in all); its group must not be updated: a bug in freezing or "
            f"in the engine (was requires_grad flipped after deepspeed.initialize?)")
