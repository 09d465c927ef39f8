"""The DeepSpeed engine of one stage: config dict, optimizer param groups, LR schedule.

The optimizer is a torch AdamW passed in (DeepSpeed's FusedAdam needs a JIT build and is not
bit-exact after a resume). Two param groups over the *trainable* parameters only:
  - decay:    matrices and convolution kernels (ndim >= 2) except embeddings;
  - no_decay: biases, norm weights (ndim < 2) and embeddings (token embeddings, the class and
              position embeddings of the patch embedding): decaying them only shrinks rare rows.
The model must already be frozen by its stage's groups (evip.stages.apply_trainable).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from evip.stages import ScheduleConfig, StageConfig

NO_DECAY_NAMES = ("tok_embeddings", "class_embedding", "position_embedding")

#: ZeRO-3 keeps parameters below this many elements whole on every rank (DeepSpeed's default);
#: the tests set it to 0 so that a tiny model's parameters are really partitioned.
ZERO3_PERSISTENCE_THRESHOLD = 100_000


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def lr_lambda(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of optim.lr at a step: linear warmup, then cosine to min_lr_ratio or constant."""
    warmup = schedule.warmup_steps or int(round(schedule.warmup_ratio * total_steps))
    floor = schedule.min_lr_ratio

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule.kind == "constant":
            return 1.0
        span = max(1, total_steps - warmup)
        t = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def deepspeed_config(stage: StageConfig) -> dict:
    """One micro-batch per rank is one packed row-set: DeepSpeed's batch size is 1 micro-batch."""
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": 0.0 if guarded(stage) else stage.clip_grad,   # GuardedAdamW clips
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": stage.zero_stage},
        "bf16": {"enabled": stage.precision == "bf16"},
        # under bf16, reduce gradients across ranks and accumulate micro-batches in fp32: bf16's
        # 8-bit mantissa loses small gradients in a sum over ranks or grad_accum micro-batches
        # (DeepSpeed's defaults follow the model dtype). ZeRO-1 then uses DeepSpeed's BF16_Optimizer.
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
    }
    if stage.zero_stage == 3:
        # consolidation reads the fp32 masters (evip/stage_weights.py), not 16-bit weights at save
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False,
                                         "stage3_param_persistence_threshold": ZERO3_PERSISTENCE_THRESHOLD})
    return cfg


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW that clips its gradients itself and skips a step whose gradients are not all
    finite, saying so in `overflow`, the attribute DeepSpeed reads to count a skipped step (and not
    advance the LR schedule). Used under ZeRO-0 fp32, where DeepSpeed hands the grads straight to
    the optimizer (and computes no norm it would report): one fused pass gives the global norm
    (`grad_norm`, before clipping), the finiteness check and the clip, where DeepSpeed's clip plus
    a separate check walked the gradients three times. ZeRO-1/2/3 and bf16 wrap the optimizer in
    their own, which clips, reports the norm and skips non-finite steps the same way."""

    overflow = False

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return super().step(closure)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        self.grad_norm = float(norm)
        self.overflow = not math.isfinite(self.grad_norm)
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm, foreach=True)
        return super().step(closure)


def build_engine(model: nn.Module, stage: StageConfig, total_steps: int, load_universal: bool = False):
    """deepspeed.initialize with a torch AdamW and a LambdaLR; returns the engine."""
    import deepspeed

    groups = param_groups(model, stage.optim.weight_decay)
    kwargs = dict(lr=stage.optim.lr, betas=tuple(stage.optim.betas), eps=stage.optim.eps)
    opt = GuardedAdamW(groups, stage.clip_grad, **kwargs) if guarded(stage) else torch.optim.AdamW(groups, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage.schedule, total_steps))
    config = deepspeed_config(stage)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    # the device init_distributed chose (cuda:0 when a task sees one GPU); DeepSpeed would take LOCAL_RANK
    args = SimpleNamespace(device_rank=torch.cuda.current_device()) if torch.cuda.is_available() else None
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=opt, lr_scheduler=sched, config=config)
    if stage.zero_stage == 0 and engine.dp_world_size == 1:
        # alone, DeepSpeed's ZeRO-0 all-reduce still flattens every gradient into a bucket and
        # copies it back (a tenth of a small model's step): skip it, as DeepSpeed does without a
        # process group
        engine.enable_backward_allreduce = False
    return engine


def guarded(stage: StageConfig) -> bool:
    """Whether the stage's optimizer is our GuardedAdamW (it clips and reports the grad norm)."""
    return stage.zero_stage == 0 and stage.precision == "fp32"


def current_lr(engine) -> float:
    return float(engine.get_lr()[0])
