"""The one-shot GPU check (run through bench/gpu_check.sh): what a first GPU must confirm, in one
process, each part recorded even when another fails. The last line printed is one JSON object;
after each part, stderr gets a `gpu_check partial: {...}` line with what is measured so far.

  kernels       packed attention in bf16 against the fp32 SDPA reference (the one mask definition),
                outputs and q/k/v gradients, max abs error: varlen (torch), flex (compiled), SDPA
                bf16, flash-attn if importable; which kernel `auto` picks
  stage_step    a real stage step (evip.trainer.StageTrainer.train_step: DeepSpeed ZeRO-1, bf16,
                NCCL with one rank) on a 2B-shaped slice (Mono-InternVL-2B / InternLM2-1.8B widths,
                --layers layers, one 8k-token packed row with images): tokens/s, MFU (evip.metrics),
                peak memory vs `evip plan`'s estimate (weights + gradients + optimizer, no
                activations), host syncs in one step (torch.cuda.set_sync_debug_mode) and where
  routed        bench/model_step.py at 2B widths: the routed step over the plain LLM's
  generate      greedy generation with the KV cache vs without: tokens/s, same tokens

--dry-run runs every part that does not need CUDA on CPU at tiny sizes (gloo instead of NCCL,
fp32 kernels, flex forward only, no varlen), so the script is tested with the suite.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def model_config(args):
    from evip.model.config import ModelConfig
    if args.dry_run:
        return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=4096,
                           image_size=56, patch_size=14, vision_hidden_size=32, img_context_token_id=511)
    return replace(ModelConfig(), num_layers=args.layers, img_context_token_id=92546)


# ---- kernels ---------------------------------------------------------------------------------

def check_kernels(args, device: torch.device) -> dict:
    from evip.model.packed_attention import attend, choose_impl, flash_attn_importable, packed_context
    cuda = device.type == "cuda"
    t, hq, hkv, d = (8192, 16, 8, 128) if cuda else (300, 4, 2, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    seq = torch.full((2, t), -1, device=device)
    for row, parts in enumerate(((0.5, 0.3, 0.15), (1.0,))):    # samples + padding; one whole sample
        pos = 0
        for i, share in enumerate(parts):
            n = int(share * t)
            seq[row, pos:pos + n] = i
            pos += n
    g = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(2, t, h, d, generator=g, device=device) for h in (hq, hkv, hkv)]
    grad_out = torch.randn(2, t, hq * d, generator=g, device=device)

    def run(impl: str, dt: torch.dtype, backward: bool):
        q, k, v = (x.to(dt).requires_grad_(backward) for x in base)
        with torch.set_grad_enabled(backward):
            out = attend(q, k, v, packed_context(seq, impl))
            if backward:
                out.backward(grad_out.to(dt))
        return out.float(), [x.grad.float() for x in (q, k, v)] if backward else []

    ref_out, ref_grads = run("sdpa", torch.float32, True)
    impls = ["sdpa", "flex"] + (["varlen"] if cuda else []) + (["flash"] if cuda and flash_attn_importable() else [])
    result = {"shape": {"rows": 2, "T": t, "heads": hq, "kv_heads": hkv, "head_dim": d}, "dtype": str(dtype),
              "auto_picks": choose_impl("auto", dtype, device), "max_abs_error": {}}
    for impl in impls:
        backward = cuda or impl != "flex"             # torch 2.13: no flex backward on CPU
        t0 = time.perf_counter()
        out, grads = run(impl, dtype, backward)
        err = {"out": (out - ref_out).abs().max().item()}
        for name, a, b in zip("qkv", grads, ref_grads):
            err[f"d{name}"] = (a - b).abs().max().item()
        err["seconds_incl_compile"] = round(time.perf_counter() - t0, 3)
        result["max_abs_error"][impl] = err
    result["reference_scale"] = {"out": ref_out.abs().max().item(), "dq": ref_grads[0].abs().max().item()}
    return result


# ---- a stage step ----------------------------------------------------------------------------

def stage_trainer(args, cfg, weights: Path, device: torch.device):
    from evip.config import load_config
    from evip.stages import StageConfig
    from evip.trainer import StageContext, StageTrainer
    from stage_cost import Batches
    stage = load_config(StageConfig, None, ["name=gpu_check", "trainable=[all]", "steps=1000000", "zero_stage=1",
                                            "precision=bf16", "data.recipe=unused", "optim.lr=1e-5",
                                            "schedule.kind=constant", "eval.text_corpus=''"])
    ctx = StageContext(stage=stage, source="bench/gpu_check.py", index=0, stage_dir=Path(tempfile.mkdtemp()),
                       input_weights=weights, model_cfg=cfg, make_loader=lambda: Batches(cfg, args.tokens, 2))
    trainer = StageTrainer(ctx)
    trainer.build()
    return trainer


def count_syncs(step) -> tuple[int, list]:
    """Host syncs in one call of step(): CUDA's sync debug mode warns at each one."""
    if not torch.cuda.is_available():
        step()
        return None, []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs), where.most_common(12)


def check_stage_step(args, cfg, device: torch.device) -> dict:
    from evip import stage_weights
    from evip.commands.plan import stage_memory
    from evip.metrics import peak_flops, step_flops
    from evip.model.mono import MonoInternVL
    from evip.model.packed_attention import choose_impl
    weights = Path(tempfile.mkdtemp()) / "model.safetensors"
    torch.manual_seed(0)
    model = MonoInternVL(cfg)
    stage_weights.write_weights({n: p.detach().float() for n, p in model.named_parameters()}, weights)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    trainer = stage_trainer(args, cfg, weights, device)
    it = iter(trainer.loader)
    for _ in range(2):                                # warm-up (flex/NCCL/allocator)
        trainer.train_step(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, stats = [], None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        stats, _wait = trainer.train_step(it)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    flops = step_flops(cfg, stats["tokens"], stats["labelled"], stats["pairs"])
    peak = peak_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    plan = stage_memory(n_params, n_params, 1, "bf16", 1)["total"]
    out = {"params": n_params, "layers": cfg.num_layers, "tokens_per_step": stats["tokens"],
           "attn_impl": choose_impl(cfg.attn_impl, torch.bfloat16, device), "step_s": round(step_s, 4),
           "tokens_per_s": round(stats["tokens"] / step_s, 1), "mfu": None if peak is None else flops / step_s / peak,
           "loss": stats["loss"], "plan_estimate_gb": plan / 2**30}
    if device.type == "cuda":
        out["peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_over_plan"] = out["peak_alloc_gb"] / out["plan_estimate_gb"]
    n, where = count_syncs(lambda: trainer.train_step(it))
    out["host_syncs_per_step"], out["host_sync_sites"] = n, where
    out["generate"] = check_generate(args, trainer.engine.module, cfg, device)
    return out


def check_generate(args, model, cfg, device: torch.device) -> dict:
    model.eval()
    g = torch.Generator().manual_seed(1)
    top = min(1000, cfg.img_context_token_id)
    prompt = torch.cat([torch.randint(1, top, (4,), generator=g), torch.full((cfg.tokens_per_tile,), cfg.img_context_token_id),
                        torch.randint(1, top, (12,), generator=g)])[None].to(device)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=g).to(device, model.tok_embeddings.weight.dtype)
    out = {}
    with torch.no_grad():
        for use_cache in (True, False):
            t0 = time.perf_counter()
            new = model.generate(prompt, pixels, max_new_tokens=args.new_tokens, use_cache=use_cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out["cached" if use_cache else "uncached"] = {"tokens_per_s": round(new.shape[1] / (time.perf_counter() - t0), 2),
                                                          "tokens": new[0].tolist()}
    a, b = out["cached"].pop("tokens"), out["uncached"].pop("tokens")
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    out["same_leading_tokens"] = f"{same}/{len(a)}"          # bf16 may diverge after a near tie
    model.train()
    return out


# ---- routed vs plain ---------------------------------------------------------------------------

def check_routed(args) -> dict:
    sizes = (["--hidden", "64", "--ffn", "128", "--layers", "1", "--tokens", "2048", "--reps", "1", "--warmup", "0",
              "--vocab", "256"]
             if args.dry_run else ["--hidden", "2048", "--ffn", "8192", "--layers", "4", "--tokens", "8192",
                                   "--reps", "5", "--vocab", "92553"])
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "model_step.py"), *sizes], capture_output=True,
                         text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    last = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: last[k] for k in ("routed_over_plain", "routed_over_dense", "median_ms", "device", "dtype")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every part that does not need CUDA")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 2B-shaped slice")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the packed row of a stage step")
    p.add_argument("--steps", type=int, default=5, help="timed stage steps (after 2 warm-up steps)")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    if args.dry_run:
        args.tokens, args.steps, args.new_tokens = 128, 2, 4
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run on CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    os.environ.setdefault("WANDB_MODE", "disabled")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    from evip.distributed import free_port, init_distributed
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = model_config(args)
    result = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "backend": torch.distributed.get_backend(), "errors": {}}
    for name, part in (("kernels", lambda: check_kernels(args, device)),
                       ("stage_step", lambda: check_stage_step(args, cfg, device)),
                       ("routed", lambda: check_routed(args))):
        t0 = time.perf_counter()
        try:
            result[name] = part()
            result[name]["seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as e:
            traceback.print_exc()
            result[name] = None
            result["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
        print(f"gpu_check: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        # what is measured so far, so that a run cut off by the time limit still reports its parts
        print(f"gpu_check partial: {json.dumps(result)}", file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
