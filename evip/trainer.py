"""The loop of one stage, top to bottom.

    fresh model <- the previous stage's consolidated weights
    freeze by the stage's groups, THEN deepspeed.initialize (torch AdamW, LR schedule)
    resume from `latest` if there is one (engine, this rank's loader, RNG, counters)
    loop: grad_accum micro-batches -> one optimizer step; metrics; evals; checkpoints;
          stop signals and non-finite steps decided by all ranks together
    stage end: checkpoint, frozen parameters verified unchanged, consolidated fp32 weights, DONE
"""
from __future__ import annotations

import math
import os
import random
import signal
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from evip import checkpoint as ckpt
from evip import stage_weights, universal_checkpoint
from evip.atomic_files import write_atomic
from evip.batch import BATCH_KEYS
from evip.data.accounting import TooManyBadSamples, data_record, gather_stats, one_line
from evip.engine import build_engine, current_lr
from evip.metrics import attended_pairs
from evip.rank0_work import on_rank0
from evip.signals import Preempted, StopRequest, TooManyNonFinite
from evip.stages import StageConfig, apply_trainable, frozen_digest, verify_frozen


@dataclass
class StageContext:
    stage: StageConfig
    source: str                        # the stage file (for error messages)
    index: int
    stage_dir: Path
    input_weights: Path                # consolidated weights of the previous stage (or the base)
    model_cfg: Any
    make_loader: Callable[[], Any]     # this rank's StatefulDataLoader of packed batches
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    stop: StopRequest = field(default_factory=StopRequest)
    metrics: Any = None                # evip.metrics.Metrics (rank 0 writes)
    evaluator: Any = None              # evip.evals.Evaluator
    on_engine: Optional[Callable[[Any], None]] = None   # tests/benchmarks: see the live engine
    rank0_wait_s: float = 7200.0       # how long ranks wait for rank 0's host work (rank0_wait_minutes)


def planned_steps(stage: StageConfig, world_size: int) -> int:
    """Steps of the stage: `steps`, or `tokens` over the tokens one step can hold at most."""
    if stage.steps:
        return stage.steps
    return max(1, math.ceil(stage.tokens / (micro_batch_tokens(stage) * stage.grad_accum * world_size)))


def micro_batch_tokens(stage: StageConfig) -> int:
    return stage.data.token_budget * stage.data.rows


def build_placement(stage: StageConfig) -> tuple[torch.dtype, torch.device]:
    """The dtype and device the stage's model is materialised in: the training device (the GPU
    init_distributed chose, else the CPU), in bf16 for a bf16 stage. DeepSpeed would cast and move
    the module there anyway (same values, bit for bit), and the fp32 master weights come from the
    fp32 weights file (`stage_weights.restore_fp32_masters`) or the checkpoint resumed, so nothing is lost;
    on a GPU no rank holds a copy of the model in host RAM."""
    dtype = torch.bfloat16 if stage.precision == "bf16" else torch.float32
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dtype, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class StageTrainer:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.stage = ctx.stage
        self.ckpt_root = ctx.stage_dir / "ckpt"
        self.total_steps = planned_steps(ctx.stage, ctx.world_size)

    # ---- set-up ----------------------------------------------------------------------------
    def build(self) -> None:
        c = self.ctx
        model = stage_weights.build_from_weights(c.model_cfg, c.input_weights, *build_placement(self.stage))
        self.trained_groups = apply_trainable(model, self.stage, c.source)   # before the engine exists
        seed_everything(c.seed * 1000 + c.index)
        ckpt.clean_partial(self.ckpt_root, c.rank)
        latest = ckpt.resumable_checkpoint(self.ckpt_root, c.rank, c.world_size)   # verified; damaged ones skipped
        saved_ws = ckpt.read_meta(latest)["world_size"] if latest is not None else c.world_size
        elastic = saved_ws != c.world_size
        if elastic:   # a different world size: DeepSpeed's universal checkpoint + elastic data state
            universal_checkpoint.to_universal(latest, c.rank0_wait_s)
        self.engine = build_engine(model, self.stage, self.total_steps, load_universal=elastic)
        self.device = self.engine.device
        self.frozen_at_start = frozen_digest(self.engine.module)
        self.loader = c.make_loader()
        if latest is None:
            if self.stage.precision == "bf16":
                stage_weights.restore_fp32_masters(self.engine, c.input_weights)
            self.counters = ckpt.Counters()
            seed_everything(c.seed * 1000 + c.index + 7919 * c.rank)
        else:
            self.counters = ckpt.load(self.engine, latest, self.loader, c.rank, c.world_size)
            if c.rank == 0:
                how = f" written by {saved_ws} ranks, now {c.world_size} (universal checkpoint)" if elastic else ""
                print(f"[evip] stage {self.stage.name}: resumed from {latest}{how} (step {self.counters.step})",
                      flush=True)
        if c.on_engine:
            c.on_engine(self.engine)

    # ---- the loop --------------------------------------------------------------------------
    def done(self) -> bool:
        if self.stage.steps:
            return self.counters.step >= self.stage.steps
        return self.counters.tokens >= self.stage.tokens

    def data_stats(self) -> dict | None:
        """The loader's counters summed over ranks as flat `data/...` metrics (evip/data/accounting.py);
        None for a loader that keeps none. A collective: every rank calls it."""
        stats = getattr(self.loader, "stats", None)
        merged = gather_stats(stats() if callable(stats) else None)
        return data_record(merged) if merged else None

    def run(self) -> ckpt.Counters:
        self.build()
        c = self.ctx
        if c.evaluator is not None:
            c.evaluator.stage_start(self.engine, self.stage, c.stage_dir)
        last_save = time.monotonic()
        data_iter = iter(self.loader)
        faults = self.stage.faults
        while not self.done():
            t0 = time.perf_counter()
            try:
                stats, wait = self.train_step(data_iter, poison=self.counters.step in faults.nonfinite_steps)
            except TooManyBadSamples as e:      # raised by this rank's loader (a worker): stop, keep the checkpoints
                latest = ckpt.latest_checkpoint(self.ckpt_root)
                raise TooManyBadSamples(
                    f"stage {self.stage.name!r} after step {self.counters.step}: {one_line(e)}. Last checkpoint: "
                    f"{latest or 'none yet'} (intact; the same command resumes from it)") from None
            if c.rank == 0 and self.counters.step == faults.signal_after_step:
                os.kill(os.getpid(), signal.SIGUSR1)   # injected: a real signal, handled as in production
            minutes_due = (self.stage.checkpoint.every_minutes > 0 and c.rank == 0 and
                           time.monotonic() - last_save >= 60 * self.stage.checkpoint.every_minutes)
            flags = _all_reduce(torch.tensor([float(stats["nonfinite"]), float(bool(c.stop.requested)),
                                              float(minutes_due)], dtype=torch.float64, device=self.device)).cpu()
            nonfinite = flags[0] > 0 or not math.isfinite(stats["grad_norm"])
            self.counters.step += 1
            self.counters.tokens += stats["tokens"]
            self.counters.samples += stats["samples"]
            if nonfinite:
                self.counters.nonfinite += 1
                self.counters.skipped += 1
            else:
                self.counters.nonfinite = 0
            if self.counters.step % max(1, self.stage.log_every) == 0:
                stats["data"] = self.data_stats()
            if c.metrics is not None:
                c.metrics.log_step(self.stage.name, self.counters, stats, stats["lr"],
                                   time.perf_counter() - t0, wait, self.total_steps, nonfinite)
            step = self.counters.step
            if self.counters.nonfinite >= self.stage.max_nonfinite:
                self.save()
                raise TooManyNonFinite(
                    f"stage {self.stage.name!r}: {self.counters.nonfinite} non-finite steps in a row (limit "
                    f"max_nonfinite={self.stage.max_nonfinite} in {c.source}); updates were skipped and a "
                    f"checkpoint was written at step {step}. Inspect the data and lr before rerunning.")
            if c.evaluator is not None and self.stage.eval.every_steps and step % self.stage.eval.every_steps == 0 \
                    and not self.done():
                c.evaluator.evaluate(self.engine, self.stage, step)
            every = self.stage.checkpoint.every_steps
            if flags[1] > 0 or flags[2] > 0 or (every and step % every == 0 and not self.done()):
                self.save()
                last_save = time.monotonic()
                if flags[1] > 0:
                    raise Preempted(f"stage {self.stage.name!r}: stop signal {c.stop.name or 'on another rank'} "
                                    f"-> checkpoint at step {step}; rerun the same command to continue")
        return self.finish()

    def train_step(self, data_iter, poison: bool = False) -> tuple[dict, float]:
        """grad_accum micro-batches and one optimizer step. Returns global stats and data-wait time."""
        engine = self.engine
        lr = current_lr(engine)
        # on the device, read once per step: loss_sum, ntok, kind_loss[3], kind_ntok[3], tokens, samples,
        # nonfinite, attended pairs (sum of squared sample lengths, for MFU)
        acc = torch.zeros(12, dtype=torch.float64, device=self.device)
        wait = 0.0
        for _ in range(self.stage.grad_accum):
            t = time.perf_counter()
            batch = next(data_iter)
            wait += time.perf_counter() - t
            batch = {k: batch[k].to(self.device, non_blocking=True) for k in BATCH_KEYS if k in batch}
            out = engine(**batch, return_logits=False)     # the head runs on labelled positions only
            loss = out.loss * float("nan") if poison else out.loss
            engine.backward(loss)
            engine.step()
            acc[0] += out.loss_sum.detach().double() * (float("nan") if poison else 1.0)
            acc[1] += out.num_tokens.double()
            acc[2:5] += out.kind_loss_sum.detach().double()
            acc[5:8] += out.kind_num_tokens.double()
            acc[8] += (batch["seq_ids"] >= 0).sum()
            acc[9] += (batch["seq_ids"].max(dim=1).values + 1).clamp(min=0).sum()   # seq ids are 0..k-1 per row
            acc[10] += (~torch.isfinite(loss.detach())).double()
            acc[11] += attended_pairs(batch["seq_ids"])
        acc[:8] = torch.nan_to_num(acc[:8], nan=0.0, posinf=0.0, neginf=0.0)
        acc = _all_reduce(acc).cpu()
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None:       # ZeRO-0 fp32: DeepSpeed computes none, our GuardedAdamW does
            grad_norm = getattr(engine.optimizer, "grad_norm", None)
        grad_norm = float(grad_norm) if grad_norm is not None else 0.0
        if not engine.was_step_applied():
            acc[10] = max(acc[10].item(), 1.0)
        kinds = {k: (acc[2 + i] / acc[5 + i]).item() if acc[5 + i] > 0 else None
                 for i, k in enumerate(("caption", "chat", "text"))}
        loss = (acc[0] / acc[1]).item() if acc[1] > 0 else float("nan")
        return {"loss": loss if acc[10] == 0 else float("nan"), "kind_loss": kinds, "grad_norm": grad_norm,
                "lr": lr, "tokens": int(acc[8]), "samples": int(acc[9]), "labelled": int(acc[1]),
                "pairs": float(acc[11]), "nonfinite": acc[10].item() > 0}, wait

    # ---- checkpoints and the end of the stage ---------------------------------------------
    def save(self) -> Path:
        faults = self.stage.faults
        return ckpt.save(self.engine, self.ckpt_root, self.counters, self.loader, self.ctx.rank,
                         self.ctx.world_size, self.stage.checkpoint.keep_last, extra={"stage": self.stage.name},
                         hold_open_s=faults.checkpoint_sleep_s if self.counters.step == faults.checkpoint_sleep_step
                         else 0.0, enospc=self.counters.step == faults.enospc_step)

    def finish(self) -> ckpt.Counters:
        c = self.ctx
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if self.stage.checkpoint.at_stage_end and \
                (latest is None or ckpt.read_meta(latest)["counters"]["step"] != self.counters.step):
            self.save()
        verify_frozen(self.frozen_at_start, frozen_digest(self.engine.module), self.stage.name)
        if c.evaluator is not None:
            c.evaluator.evaluate(self.engine, self.stage, self.counters.step, final=True)
        state = stage_weights.consolidated_state(self.engine, c.input_weights, c.rank)

        def hand_on() -> None:     # rank 0 alone, the others wait (evip/rank0_work.py)
            stage_weights.write_weights(state, c.stage_dir / stage_weights.WEIGHTS)
            write_atomic(c.stage_dir / stage_weights.DONE, f"{self.counters.step}\n")
            if not self.stage.checkpoint.keep_after_stage:     # after DONE: a kill here loses nothing
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
        on_rank0(f"write the consolidated weights of stage {self.stage.name!r}", hand_on, c.rank0_wait_s)
        return self.counters

    def close(self) -> None:
        """Free the engine (the next stage builds its own)."""
        self.engine = None
        self.loader = None

