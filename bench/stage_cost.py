"""What a stage costs: S1.1 (frozen LLM) vs S2 (everything trains), and our engine vs bare PyTorch.

    python bench/stage_cost.py [--rounds 12] [--hidden 256] [--layers 4]

Measured side by side in one run, on the same model and the same packed batches:
  - optimizer-step time (forward + backward + step) of the S1.1 configuration / the S2
    configuration (goal <= 0.75: frozen weights need no weight gradients nor optimizer state);
  - peak memory S1.1 / S2 (each configuration alone in a child process: peak RSS on CPU, peak
    allocated on GPU);
  - our ZeRO-0 step (evip.trainer.StageTrainer.train_step on the DeepSpeed engine) / a bare
    PyTorch loop (forward, backward, clip, AdamW, LR schedule) with the S2 trainable set (goal <= 1.10).
Step times come from ONE process holding every configuration, timed step by step in turn
(A B C D A B C D ...) so machine load hits all alike. The last line is one JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_cfg(args):
    from evip.model.config import ModelConfig
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                       num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 128),
                       head_dim=64, rope_theta=10000.0, max_position_embeddings=4096, image_size=112, patch_size=14,
                       vision_hidden_size=args.hidden // 2, img_context_token_id=args.vocab - 1, pad_token_id=0)


class Batches:
    """Packed batches: per row, samples of one image (tiles x 16 tokens) + a caption, and a text sample."""

    def __init__(self, cfg, seq_len: int, n: int):
        from evip.model.layout import PackedLayout
        self.items, self.index = [], 0
        g = torch.Generator().manual_seed(0)
        tpt = cfg.tokens_per_tile
        for _ in range(n):
            ids = torch.randint(1, cfg.img_context_token_id, (1, seq_len), generator=g)
            img_tokens = 4 * tpt                                  # 4 tiles
            ids[0, 1:1 + img_tokens] = cfg.img_context_token_id
            labels = ids.clone()
            labels[0, :1 + img_tokens] = -100
            half = seq_len // 2
            seq = torch.zeros(1, seq_len, dtype=torch.long)
            seq[0, half:] = 1
            pos = torch.cat([torch.arange(half), torch.arange(seq_len - half)])[None]
            kind = torch.zeros(1, seq_len, dtype=torch.long)
            kind[0, half:] = 2
            self.items.append({"input_ids": ids, "labels": labels, "position_ids": pos, "seq_ids": seq,
                               "kind_ids": kind, "pixel_values": torch.randn(4, 3, cfg.image_size, cfg.image_size,
                                                                              generator=g),
                               # as the data loader's workers ship it: the forward then needs no host sync
                               "layout": PackedLayout.of(ids, labels, seq, cfg.img_context_token_id)})

    def __iter__(self):
        while True:
            yield self.items[self.index % len(self.items)]
            self.index += 1

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, s):
        self.index = s["index"]


def stage_cfg(trainable, zero, precision):
    from evip.config import load_config
    from evip.stages import StageConfig
    return load_config(StageConfig, None, [f"name=bench", f"trainable={trainable}", "steps=1000000",
                                           f"zero_stage={zero}", f"precision={precision}", "data.recipe=unused",
                                           "optim.lr=1e-4", "schedule.kind=constant", "eval.text_corpus=''"])


def trainer_for(args, trainable, zero, precision, weights: Path):
    from evip.trainer import StageContext, StageTrainer
    cfg = model_cfg(args)
    stage = stage_cfg(trainable, zero, precision)
    ctx = StageContext(stage=stage, source="bench", index=0, stage_dir=Path(tempfile.mkdtemp()), input_weights=weights,
                       model_cfg=cfg, make_loader=lambda: Batches(cfg, args.seq_len, 4))
    t = StageTrainer(ctx)
    t.build()
    return t


def timed(step, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def bare_loop(args, weights: Path, precision: str):
    """The same model, batches, AdamW and schedule in plain PyTorch."""
    from evip import stage_weights
    from evip.engine import lr_lambda, param_groups
    cfg = model_cfg(args)
    stage = stage_cfg("[all]", 0, precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = stage_weights.build_from_weights(cfg, weights).to(device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    opt = torch.optim.AdamW(param_groups(model, stage.optim.weight_decay), lr=stage.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage.schedule, 1000))
    it = iter(Batches(cfg, args.seq_len, 4))

    def step():
        b = {k: v.to(device) for k, v in next(it).items()}
        out = model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), stage.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        float(out.loss.detach())
    return step


def make_step(args, name: str, weights: Path):
    if name == "bare":
        return bare_loop(args, weights, "fp32")     # compared with our ZeRO-0 fp32 step
    trainable, zero = {"s1_1": ("[patch_embed,visual_ffn]", 1), "s2": ("[all]", 1), "zero0": ("[all]", 0)}[name]
    # ZeRO-0 with bf16 is refused by the stage config (no fp32 masters): the ZeRO-0 comparison runs fp32
    t = trainer_for(args, trainable, zero, "fp32" if zero == 0 else args.precision, weights)
    it = iter(t.loader)
    return lambda: t.train_step(it)


def child(args) -> dict:
    """Peak memory of one configuration, alone in this process."""
    from evip.distributed import init_distributed
    init_distributed()
    step = make_step(args, args.child, Path(args.weights))
    timed(step, 3)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak}


def run_child(args, name: str, weights: Path) -> dict:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29600 + os.getpid() % 300), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, __file__, "--child", name, "--weights", str(weights),
           "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--seq-len", str(args.seq_len), "--precision", args.precision]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child {name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=12, help="interleaved timed steps per configuration (2 warm-up)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--child", default="")
    p.add_argument("--weights", default="")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from evip import stage_weights
    from evip.model.mono import MonoInternVL
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = MonoInternVL(model_cfg(args))
    weights = tmp / "model.safetensors"
    stage_weights.write_weights({n: p.detach().float() for n, p in model.named_parameters()}, weights)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    peak = {name: run_child(args, name, weights)["peak_bytes"] for name in ("s1_1", "s2")}
    # step times: every configuration in this one process, interleaved step by step
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(29300 + os.getpid() % 300)})
    from evip.distributed import init_distributed
    init_distributed()
    steps = {name: make_step(args, name, weights) for name in ("s1_1", "s2", "zero0", "bare")}
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            t = timed(step, 1)[0]
            if r >= 2:                                   # the first rounds warm up
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "precision": args.precision, "params": n_params, "seq_len": args.seq_len, "timed_steps": args.rounds - 2,
           "step_s": {k: round(v, 4) for k, v in med.items()},
           "s1_1_over_s2_step_time": round(med["s1_1"] / med["s2"], 3),
           "s1_1_over_s2_peak_memory": round(peak["s1_1"] / peak["s2"], 3),
           "zero0_over_bare_pytorch": round(med["zero0"] / med["bare"], 3),
           "goals": {"s1_1_over_s2_step_time": 0.75, "zero0_over_bare_pytorch": 1.10}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
