"""`evip plan PIPELINE [key=value ...] [--world-size N]`: what each stage trains and what it costs.

Per stage: trainable and frozen parameters by group; weight, gradient and optimizer memory per rank
for the stage's ZeRO stage and precision at the given world size; tokens and steps. The model is
built on the meta device (no memory, no weights read), so config errors (a group that matches no
parameter, a missing recipe, a stage without trainable parameters) surface here in seconds.

Memory model (bytes per parameter, P all, T trainable, W world size, Z ZeRO stage):
    weights    bf16: 2P (fp32: 4P), / W under Z3
    fp32 master (bf16 only) 4T, / W under Z>=1
    gradients  bf16: 2T (fp32: 4T), / W under Z>=2
    optimizer  AdamW m and v: 8T, / W under Z>=1
Activations are not included (they depend on the token budget and activation checkpointing).
"""
from __future__ import annotations

GB = 2**30


def register(sub) -> None:
    p = sub.add_parser("plan", help="per-stage trainable parameters, memory per rank, tokens and steps")
    p.add_argument("pipeline", help="pipeline YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `evip run`")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    p.set_defaults(func=main)


def stage_memory(total: int, trainable: int, zero: int, precision: str, world: int) -> dict[str, float]:
    wbytes = 2 if precision == "bf16" else 4
    weights = wbytes * total / (world if zero >= 3 else 1)
    master = (4 * trainable if precision == "bf16" else 0) / (world if zero >= 1 else 1)
    grads = wbytes * trainable / (world if zero >= 2 else 1)
    optim = 8 * trainable / (world if zero >= 1 else 1)
    return {"weights": weights + master, "grads": grads, "optimizer": optim, "total": weights + master + grads + optim}


def plan_rows(lp, world_size: int) -> list[dict]:
    from evip.model.groups import named_groups
    from evip.model.meta_load import build_empty
    from evip.pipeline import check_pipeline, planned_model_config
    from evip.trainer import micro_batch_tokens, planned_steps

    model_cfg = planned_model_config(lp)
    trained = check_pipeline(lp, model_cfg)
    groups = {g: sum(p.numel() for _, p in ps) for g, ps in named_groups(build_empty(model_cfg)).items()}
    total = sum(groups.values())
    rows = []
    for stage, _ in lp.stages:
        on = set(trained[stage.name])
        t = sum(n for g, n in groups.items() if g in on)
        steps = planned_steps(stage, world_size)
        tokens = stage.tokens or steps * micro_batch_tokens(stage) * stage.grad_accum * world_size
        rows.append({"stage": stage.name, "trainable": {g: groups[g] for g in groups if g in on and groups[g]},
                     "frozen": {g: groups[g] for g in groups if g not in on and groups[g]},
                     "trainable_params": t, "total_params": total, "zero": stage.zero_stage,
                     "precision": stage.precision, "steps": steps, "tokens": tokens,
                     "length": (f"steps={stage.steps}: ends after {stage.steps} optimizer steps" if stage.steps else
                                f"tokens={stage.tokens:,}: ends once that many tokens were trained on "
                                f"(about {steps} steps with full rows)"),
                     "memory": stage_memory(total, t, stage.zero_stage, stage.precision, world_size)})
    return rows


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else str(n)


def main(args) -> int:
    from evip.pipeline import load_pipeline

    lp = load_pipeline(args.pipeline, args.overrides)
    rows = plan_rows(lp, args.world_size)
    print(f"pipeline {lp.cfg.name}: {len(rows)} stages, {_m(rows[0]['total_params'])} parameters, "
          f"world size {args.world_size}")
    print("stage length: a stage runs for `steps` optimizer steps or until `tokens` tokens; the one set last "
          "wins (`<stage>.steps=N` on the command line replaces the file's tokens, `tokens=N` its steps)")
    for r in rows:
        mem = r["memory"]
        print(f"\n[{r['stage']}] ZeRO-{r['zero']} {r['precision']}  steps {r['steps']}  tokens {r['tokens']:,}")
        print(f"  length: {r['length']}")
        print(f"  trainable {_m(r['trainable_params'])} ({100 * r['trainable_params'] / r['total_params']:.1f}%): "
              + ", ".join(f"{g} {_m(n)}" for g, n in r["trainable"].items()))
        print("  frozen: " + (", ".join(f"{g} {_m(n)}" for g, n in r["frozen"].items()) or "none"))
        print(f"  memory per rank: weights {mem['weights'] / GB:.2f} GiB, grads {mem['grads'] / GB:.2f} GiB, "
              f"optimizer {mem['optimizer'] / GB:.2f} GiB, total {mem['total'] / GB:.2f} GiB (+ activations)")
    return 0
