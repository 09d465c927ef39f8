"""Forward + backward cost of modality routing, measured side by side in one run.

Three variants of the same model on the same packed tokens (half image, half text):
  routed  the model's own decoder layers: each FFN expert runs only on its own tokens
  plain   the plain LLM of the same active size: every token through the one text FFN
  dense   the official Mono-InternVL training formula: both FFNs on every token, mixed by the mask
All share the embedding (patch embedding + projector included), attention, head and loss; the
repetitions are interleaved (routed, plain, dense, routed, ...) and the median is taken.

    .venv/bin/python bench/model_step.py [--hidden 512 --layers 4 --tokens 2048 --reps 5]

The last line printed is one JSON object: routed_over_plain (goal <= 1.05) and routed_over_dense
(goal <= 0.80).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from evip.batch import IGNORE_INDEX
from evip.model.config import ModelConfig
from evip.model.experts import dense_masked_ffn
from evip.model.loss import packed_lm_loss
from evip.model.mono import MonoInternVL
from evip.model.packed_attention import choose_impl, packed_context
from evip.model.rope import rope_for
from evip.model.routing import Routing

VARIANTS = ("routed", "plain", "dense")


def build_batch(cfg: ModelConfig, tokens: int, device: torch.device) -> dict:
    """One row of `tokens`: 4 samples, each an image (half its tokens) followed by its caption."""
    g = torch.Generator().manual_seed(0)
    per_sample = tokens // 4
    tiles = per_sample // 2 // cfg.tokens_per_tile
    if tiles < 1:
        raise SystemExit(f"--tokens {tokens} too small for 4 samples of {cfg.tokens_per_tile}-token tiles")
    ids = torch.randint(1, cfg.vocab_size - 16, (1, tokens), generator=g)
    seq_ids = torch.arange(tokens).div(per_sample, rounding_mode="floor").clamp(max=3)[None]
    pos = torch.arange(tokens)[None] - seq_ids * per_sample
    n_img = tiles * cfg.tokens_per_tile
    for s in range(4):
        ids[0, s * per_sample + 1: s * per_sample + 1 + n_img] = cfg.img_context_token_id
    labels = torch.where(ids == cfg.img_context_token_id, IGNORE_INDEX, ids)
    pixels = torch.randn(4 * tiles, 3, cfg.image_size, cfg.image_size, generator=g)
    batch = dict(input_ids=ids, labels=labels, seq_ids=seq_ids, position_ids=pos,
                 kind_ids=torch.zeros_like(ids), pixel_values=pixels)
    return {k: v.to(device) for k, v in batch.items()}


def step(model: MonoInternVL, batch: dict, variant: str) -> torch.Tensor:
    """Forward + backward of one variant; returns the loss."""
    cfg = model.cfg
    h, image_mask = model.embed(batch["input_ids"], batch["pixel_values"])
    ctx = packed_context(batch["seq_ids"], choose_impl(cfg.attn_impl, h.dtype, h.device))
    rope = rope_for(batch["position_ids"], cfg.head_dim, cfg.rope_theta, h.dtype)
    routing = Routing.from_mask(image_mask)
    for layer in model.layers:
        if variant == "routed":
            h = layer(h, rope, ctx, routing)
            continue
        h = layer.attention_block(h, rope, ctx, routing)
        normed = layer.ffn_norm(h)
        if variant == "plain":
            h = h + layer.feed_forward(normed)
        else:
            h = h + dense_masked_ffn(normed, image_mask, layer.feed_forward, layer.feed_forward_ve)
    logits = model.head(model.norm(h))
    loss = packed_lm_loss(logits, batch["labels"], batch["seq_ids"], batch["kind_ids"]).loss
    loss.backward()
    return loss.detach()


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=2048, help="intermediate size (InternLM2: 4x hidden)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: CPU time measures the work)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    heads = args.hidden // 64
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 2), head_dim=64,
                      image_size=448, patch_size=14, vision_hidden_size=args.hidden // 2,
                      img_context_token_id=args.vocab - 1)
    torch.manual_seed(0)
    model = MonoInternVL(cfg).to(device=device, dtype=dtype).train()
    batch = build_batch(cfg, args.tokens, device)
    image_fraction = (batch["input_ids"] == cfg.img_context_token_id).float().mean().item()

    # On a CPU shared with other work, wall time swings by 2x between identical runs; the CPU
    # time of a single-threaded process measures the work itself. On CUDA: wall time, synchronised.
    clock = "wall" if device.type == "cuda" else "cpu"
    times: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in VARIANTS}
    losses = {}
    for rep in range(args.warmup + args.reps):
        for variant in VARIANTS:
            model.zero_grad(set_to_none=True)
            wall, cpu = timed(lambda: losses.__setitem__(variant, step(model, batch, variant).item()), device)
            if rep >= args.warmup:
                times[variant]["wall"].append(wall)
                times[variant]["cpu"].append(cpu)
    med = {v: {c: statistics.median(ts) for c, ts in by_clock.items()} for v, by_clock in times.items()}
    for v in VARIANTS:
        print(f"{v:7s} median wall {med[v]['wall'] * 1e3:9.1f} ms  cpu {med[v]['cpu'] * 1e3:9.1f} ms  "
              f"{clock} runs {[round(t * 1e3, 1) for t in times[v][clock]]}  loss {losses[v]:.4f}")
    result = dict(
        bench="model_step", device=str(device), dtype=args.dtype, clock=clock,
        threads=torch.get_num_threads(), hidden=args.hidden, ffn=args.ffn, layers=args.layers,
        tokens=args.tokens, vocab=args.vocab, image_token_fraction=round(image_fraction, 3), reps=args.reps,
        median_ms={v: round(m[clock] * 1e3, 1) for v, m in med.items()},
        median_wall_ms={v: round(m["wall"] * 1e3, 1) for v, m in med.items()},
        routed_over_plain=round(med["routed"][clock] / med["plain"][clock], 3),
        routed_over_dense=round(med["routed"][clock] / med["dense"][clock], 3),
        goal_routed_over_plain=1.05, goal_routed_over_dense=0.80)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
