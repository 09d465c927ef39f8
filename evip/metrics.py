"""Training metrics: a console line with ETA, a JSONL file in the run dir and wandb (rank 0 only).

Per step: loss (and per kind: caption, chat, text), grad norm, lr, tokens/s, samples/s, the
fraction of the step spent waiting for data, the step's model FLOPs, MFU on GPUs, peak memory,
skipped steps.

MFU counts the FLOPs of the ROUTED model per optimizer step (all ranks), forward + backward:
    6 * N_body * tokens + 6 * H * V * labelled + 12 * L * (n_heads * head_dim) * sum_i n_i^2
with N_body = attention + ONE FFN (the token's modality expert) + norms per layer, so a visual FFN
adds parameters but no FLOPs per token (embedding lookups and the patch embedding are not counted);
the head (H x V) runs on the `labelled` positions only (the trainer's return_logits=False); and
n_i the length of each packed sample: a token attends only within its sample, so a row of k
samples costs sum n_i^2, not T^2 (12 * L * d per attended pair: QK^T and AV, forward and backward,
counted over the full square as PaLM's MFU does, not halved for the causal mask).
Peak memory is the step's own peak: the counter is reset after every logged step.
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
    "H100 PCIe": 756e12, "H800 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12,
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
    """Parameters one token touches in the routed model (no embedding lookup, one FFN, the head)."""
    return body_params_per_token(cfg) + cfg.hidden_size * cfg.vocab_size


def body_params_per_token(cfg) -> int:
    """`active_params_per_token` without the head."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * h
    ffn = 3 * h * cfg.intermediate_size
    return cfg.num_layers * (attn + ffn + 2 * h) + h


def attended_pairs(seq_ids: torch.Tensor) -> torch.Tensor:
    """sum over the packed samples of (sample length)^2, from seq_ids [B, T] (-1 = padding), on the
    tensor's device without a host sync (a scatter into fixed-size slots, no bincount)."""
    b, t = seq_ids.shape
    slot = torch.arange(b, device=seq_ids.device)[:, None] * t + seq_ids.clamp(min=0)
    slot = torch.where(seq_ids >= 0, slot, b * t)                       # padding: one spare slot
    counts = torch.zeros(b * t + 1, dtype=torch.float64, device=seq_ids.device)
    counts.index_add_(0, slot.reshape(-1), torch.ones(b * t, dtype=torch.float64, device=seq_ids.device))
    return (counts[:-1] ** 2).sum()


def step_flops(cfg, tokens: float, labelled: float, pairs: float) -> float:
    """Model FLOPs (fwd + bwd) of `tokens` non-padding tokens, `labelled` of them through the head,
    whose samples hold `pairs` = sum n_i^2 attended pairs (see the module docstring)."""
    attn_width = cfg.num_heads * cfg.head_dim
    return (6.0 * body_params_per_token(cfg) * tokens + 6.0 * cfg.hidden_size * cfg.vocab_size * labelled
            + 12.0 * cfg.num_layers * attn_width * pairs)


def memory_stats() -> dict:
    """The peak memory since the last `reset_peak_memory()` (GPU) or of the process (CPU RSS)."""
    if torch.cuda.is_available():
        return {"mem_alloc_gb": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    try:
        import resource
        return {"rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except ImportError:
        return {}


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


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
                 total_steps: int, skipped: bool) -> None:
        """`stats`: the step's global tokens, samples, labelled tokens and attended pairs (trainer)."""
        if self.rank != 0:
            reset_peak_memory()
            return
        tokens, samples = stats["tokens"], stats["samples"]
        rec = {"kind": "train", "stage": stage, "step": counters.step, "tokens_total": counters.tokens,
               "loss": stats["loss"], "grad_norm": stats["grad_norm"], "lr": lr,
               "tokens_per_s": tokens / step_time, "samples_per_s": samples / step_time,
               "data_wait_frac": min(1.0, wait / step_time), "step_time": step_time,
               "skipped": bool(skipped), "skipped_total": counters.skipped, "time": time.time(),
               **(stats.get("data") or {}),
               **{f"loss_{k}": v for k, v in stats["kind_loss"].items() if v is not None}, **memory_stats()}
        reset_peak_memory()
        if "pairs" in stats:
            rec["step_flops"] = step_flops(self.model_cfg, tokens, stats["labelled"], stats["pairs"])
            if self.peak:
                rec["mfu"] = rec["step_flops"] / self.world_size / step_time / self.peak
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
