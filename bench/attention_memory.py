"""Peak memory and time of packed attention and of the head + loss, side by side in one run.

    python bench/attention_memory.py [--lengths 4096,8192,16384,32768] [--samples 8]
                                     [--head-lengths 2048,4096,6144 --hidden 512 --vocab 92544]

Attention: one packed row of T tokens holding `--samples` samples, q/k/v [1, T, heads, d] (GQA),
through evip's kernels (evip/model/packed_attention.py):
  mask    SDPA with the dense [B, 1, T, T] block mask (the reference; O(T^2) memory)
  flex    flex_attention with the document-causal BlockMask (compiled; --flex eager skips the
          compile, for a quick run)
  varlen  torch's varlen_attn over cu_seqlens (CUDA only)
On a GPU each is forward + backward in bf16. On CPU torch 2.13 has no flex_attention backward, so
every variant is measured forward only there (fp32), and `mode` says so.
Head + loss: N labelled positions of hidden size H against a V-word vocabulary, forward + backward:
  logits   lm_loss(F.linear(h, W)): the [N, V] logits, their fp32 copy, log-softmax and gradients
  chunked  loss.head_lm_loss: one chunk of logits at a time (what training runs)

Each measurement runs alone in a child process: peak memory is the peak allocated on a GPU, and on
CPU the peak resident memory sampled every millisecond during the call minus the resident memory
before it. Times are one call after a warm-up (the warm-up also compiles). A variant whose estimate
exceeds --max-gb is skipped (null). The last line printed is one JSON object: per length the
figures and the ratios flex / mask (and varlen / mask on GPU), per N chunked / logits.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ---- child: one measurement ------------------------------------------------------------------

class PeakRSS:
    """Peak resident memory above the starting level, sampled from /proc/self/statm."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self.rss()
        self.running = False

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def attention_call(args, variant: str, t: int, device: torch.device, dtype: torch.dtype):
    from evip.model.packed_attention import attend, packed_context
    n = t // args.samples
    seq = torch.arange(t, device=device).div(n, rounding_mode="floor").clamp(max=args.samples - 1)[None]
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(1, t, args.heads, args.head_dim)] + [(1, t, args.kv_heads, args.head_dim)] * 2
    backward = device.type == "cuda"
    q, k, v = (torch.randn(s, generator=g, device=device, dtype=dtype).requires_grad_(backward) for s in shapes)
    impl = {"mask": "sdpa", "flex": "flex", "varlen": "varlen"}[variant]
    cpu_flex = None
    if variant == "flex" and device.type == "cpu":   # evip compiles flex on GPU only; here as asked
        from torch.nn.attention.flex_attention import flex_attention
        cpu_flex = torch.compile(flex_attention, dynamic=False) if args.flex == "compiled" else flex_attention

    def call():
        with torch.set_grad_enabled(backward):
            ctx = packed_context(seq, impl)        # the mask / block mask / cu_seqlens: per forward
            if cpu_flex is not None:
                out = cpu_flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=ctx.block_mask,
                               enable_gqa=True)
            else:
                out = attend(q, k, v, ctx)
            if backward:
                out.float().sum().backward()
        return out
    return call


def head_call(args, variant: str, n: int, device: torch.device, dtype: torch.dtype):
    import torch.nn.functional as F
    from evip.model.loss import head_lm_loss, lm_loss
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, args.hidden, generator=g, device=device, dtype=dtype).requires_grad_()
    w = (0.02 * torch.randn(args.vocab, args.hidden, generator=g, device=device, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, args.vocab, (n,), generator=g, device=device)

    def call():
        h.grad = w.grad = None
        parts = lm_loss(F.linear(h, w), targets, None) if variant == "logits" else head_lm_loss(h, w, targets, None)
        parts.loss.backward()
        return parts.loss
    return call


def child(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kind, variant, size = args.child.split(":")
    make = attention_call if kind == "attn" else head_call
    call = make(args, variant, int(size), device, dtype)
    call()                                          # warm-up (and compile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.extra
    print(json.dumps({"peak_mb": peak / 2**20, "time_s": seconds}))


# ---- parent: side by side ----------------------------------------------------------------------

def estimate_gb(args, kind: str, variant: str, size: int) -> float:
    if kind == "attn" and variant == "mask":
        return 6 * size * size / 2**30                       # bool mask + its float bias, per row
    if kind == "head" and variant == "logits":
        return 14 * size * args.vocab / 2**30                # bf16/fp32 logits, fp32 copy, grads
    return 0.0


def measure(args, kind: str, variant: str, size: int):
    if estimate_gb(args, kind, variant, size) > args.max_gb:
        return None
    cmd = [sys.executable, __file__, "--child", f"{kind}:{variant}:{size}", *args.passthrough]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{kind} {variant} {size}: over --timeout {args.timeout:.0f} s, skipped", file=sys.stderr)
        return None
    if res.returncode != 0:
        print(f"{kind} {variant} {size}: failed ({res.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def ratio(a, b, key):
    return None if a is None or b is None or not b[key] else a[key] / b[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,8192,16384,32768")
    p.add_argument("--samples", type=int, default=8, help="samples packed in the row")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--flex", choices=["compiled", "eager"], default="compiled")
    p.add_argument("--head-lengths", default="2048,4096,6144")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=92544, help="InternLM2's vocabulary by default")
    p.add_argument("--max-gb", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    args.passthrough = [f"--samples={args.samples}", f"--heads={args.heads}", f"--kv-heads={args.kv_heads}",
                        f"--head-dim={args.head_dim}", f"--flex={args.flex}", f"--hidden={args.hidden}",
                        f"--vocab={args.vocab}"]
    cuda = torch.cuda.is_available()
    variants = ["mask", "flex"] + (["varlen"] if cuda else [])
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "mode": "forward+backward, bf16" if cuda else "forward only (no flex backward on CPU), fp32",
              "attention": {}, "head_loss": {}}
    for t in (int(x) for x in args.lengths.split(",") if x):          # --lengths "": head + loss only
        row = {v: measure(args, "attn", v, t) for v in variants}
        for v in variants[1:]:
            row[f"{v}_over_mask_memory"] = ratio(row[v], row["mask"], "peak_mb")
            row[f"{v}_over_mask_time"] = ratio(row[v], row["mask"], "time_s")
        result["attention"][str(t)] = row
        print(f"attention T={t}: " + "  ".join(f"{v} {row[v]['peak_mb']:.0f} MB {row[v]['time_s']:.3f} s"
                                               if row[v] else f"{v} skipped" for v in variants), flush=True)
    for n in (int(x) for x in args.head_lengths.split(",") if x):
        row = {v: measure(args, "head", v, n) for v in ("logits", "chunked")}
        row["chunked_over_logits_memory"] = ratio(row["chunked"], row["logits"], "peak_mb")
        row["chunked_over_logits_time"] = ratio(row["chunked"], row["logits"], "time_s")
        result["head_loss"][str(n)] = row
        print(f"head+loss N={n} V={args.vocab}: " + "  ".join(
            f"{v} {row[v]['peak_mb']:.0f} MB {row[v]['time_s']:.3f} s" if row[v] else f"{v} skipped"
            for v in ("logits", "chunked")), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
