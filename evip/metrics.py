"""Training metrics: a console line with ETA, a JSONL file in the run dir and wandb (rank 0 only).

Per step: loss (and per kind: caption, chat, text), grad norm, lr, tokens/s, samples/s, the
fraction of the step spent waiting for data, MFU on GPUs, peak memory, skipped steps.

MFU counts the FLOPs of the ROUTED model: every token goes through the shared attention and ONE
FFN (its modality's expert), so a visual FFN adds parameters but no FLOPs per token:
    flops/token = 6 * N_active + 6 * L * (n_heads * head_dim) * context     (fwd + bwd)
with N_active = attention + one FFN + norms per layer, plus the head (embedding lookups are free),
and `context` the mean attended length (half the packed row length: causal).
wandb runs offline in the run dir unless `wandb.project` is set; `WANDB_MODE` is respected; a
wandb failure is printed once and never stops the run.
Data accounting (every `log_every` steps, summed over ranks): the `data/...` keys of
evip/data/accounting.py `data_record` (samples per source, bad and filtered samples per source and
reason, the realised mixture, packing efficiency); the console shows packing, bad and filtered shares.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from evip.data.accounting import data_summary

# dense bf16 tensor-core peak FLOP/s per device (vendor datasheets, without sparsity)
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "A10G": 70e12, "A10": 125e12, "A6000": 155e12,
    "L40S": 362e12, "L40": 181e12, "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12,
    "MI300X": 1307e12, "MI250X": 383e12,
}


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of a GPU from its name; None when unknown (or on CPU)."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None


def active_params_per_token(cfg) -> int:
    """Parameters one token touches in the routed model (no embedding lookup, one FFN)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * h
    ffn = 3 * h * cfg.intermediate_size
    return cfg.num_layers * (attn + ffn + 2 * h) + h + h * cfg.vocab_size


def flops_per_token(cfg, row_len: int) -> float:
    return 6.0 * active_params_per_token(cfg) + 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * row_len / 2


def memory_stats() -> dict:
    if torch.cuda.is_available():
        return {"mem_alloc_gb": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    try:
        import resource
        return {"rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except ImportError:
        return {}


class Metrics:
    def __init__(self, run_dir: Path, rank: int, model_cfg, wandb_cfg=None, run_name: str = "evip"):
        self.rank = rank
        self.model_cfg = model_cfg
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if rank == 0 else None
        self.peak = None
        self.world_size = 1
        if torch.cuda.is_available():
            self.peak = peak_flops(torch.cuda.get_device_name())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size = torch.distributed.get_world_size()
        self.wandb = None
        self.start = time.monotonic()
        if rank == 0 and wandb_cfg is not None and wandb_cfg.enabled:
            self.wandb = _start_wandb(run_dir, wandb_cfg, run_name)

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            try:
                self.wandb.log({f"{record['stage']}/{k}": v for k, v in record.items()
                                if isinstance(v, (int, float)) and v is not None})
            except Exception as e:  # never let tracking stop training
                print(f"[evip] wandb logging failed, disabled: {e}", file=sys.stderr)
                self.wandb = None

    def log_step(self, stage: str, counters, stats: dict, lr: float, step_time: float, wait: float,
                 total_steps: int, skipped: bool, row_len: int = 0) -> None:
        if self.rank != 0:
            return
        tokens, samples = stats["tokens"], stats["samples"]
        rec = {"kind": "train", "stage": stage, "step": counters.step, "tokens_total": counters.tokens,
               "loss": stats["loss"], "grad_norm": stats["grad_norm"], "lr": lr,
               "tokens_per_s": tokens / step_time, "samples_per_s": samples / step_time,
               "data_wait_frac": min(1.0, wait / step_time), "step_time": step_time,
               "skipped": bool(skipped), "skipped_total": counters.skipped, "time": time.time(),
               **(stats.get("data") or {}),
               **{f"loss_{k}": v for k, v in stats["kind_loss"].items() if v is not None}, **memory_stats()}
        if self.peak and row_len:
            per_rank = tokens / self.world_size
            rec["mfu"] = per_rank * flops_per_token(self.model_cfg, row_len) / step_time / self.peak
        self.write(rec)
        left = max(0, total_steps - counters.step) * step_time
        print(f"[{stage}] step {counters.step}/{total_steps} loss {stats['loss']:.4f} "
              f"gnorm {stats['grad_norm']:.3f} lr {lr:.2e} tok/s {rec['tokens_per_s']:.0f} "
              f"wait {100 * rec['data_wait_frac']:.0f}%" + (f" mfu {100 * rec['mfu']:.1f}%" if "mfu" in rec else "")
              + (f" {data_summary(stats['data'])}" if stats.get("data") else "")
              + (" SKIPPED(non-finite)" if skipped else "") + f" eta {_hms(left)}", flush=True)

    def log_eval(self, stage: str, step: int, values: dict) -> None:
        self.write({"kind": "eval", "stage": stage, "step": step, "time": time.time(), **values})
        if self.rank == 0:
            shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v!r}" for k, v in values.items())
            print(f"[{stage}] eval @ {step}: {shown}", flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass
            self.wandb = None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _start_wandb(run_dir: Path, cfg, name: str):
    import os
    try:
        import wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if cfg.project else "offline")
        return wandb.init(project=cfg.project or "evip", entity=cfg.entity or None, name=name,
                          dir=str(run_dir), mode=mode, resume="allow", id=_run_id(run_dir),
                          settings=wandb.Settings(silent=True, init_timeout=30))
    except Exception as e:
        print(f"[evip] wandb unavailable ({type(e).__name__}: {e}); metrics go to metrics.jsonl only",
              file=sys.stderr)
        return None


def _run_id(run_dir: Path) -> str:
    """A stable wandb run id per run dir, so a resumed run continues the same wandb run."""
    f = Path(run_dir) / "wandb_id"
    if not f.is_file():
        import uuid
        f.write_text(uuid.uuid4().hex[:12])
    return f.read_text().strip()


def counters_dict(counters) -> dict:
    return asdict(counters)
