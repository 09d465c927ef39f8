"""Measure an ablation variant's run, and write the ablation table, plots and JSON.

Per variant (`measure_variant`), from its run directory:
- `text_loss_base`, `text_loss`, `text_loss_change`, `text_identical`: the text-only loss on a real
  corpus (the forgetting monitor, evip/evals.py) before training and at the end of the last stage;
  perplexity = exp(loss). `text_identical` is an exact float equality, not a tolerance;
- `heldout_caption_loss` (own picture), `..._other_image` (each caption under another held-out
  picture), `image_gain` (their difference) and `image_ratio` (other / own): at the last stage's end;
- `probe`: accuracy on the held-out caption probes per kind (colour, shape) with chance;
- `samples`, `steps`, `seconds`: pictures trained on, optimizer steps and training time, summed
  over the stages; `trainable_params`: the last stage's trainable parameter count.

`write_ablation_report` writes RUN_DIR/ablations.json (every variant's figures), ablations.md (the
table, one section per study) and ablations.png (image gain and probe accuracy per variant, and the
data-scaling curve), and returns the JSON object.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from evip.report import count_trainable, read_metrics, read_start_losses

STUDY_TITLES = {
    "frozen_llm": "Frozen LLM (EViP) vs full fine-tuning in S1.1/S1.2",
    "visual_expert": "The visual expert: copied from the text FFN, random, or none",
    "data_scaling": "Data scaling: the same recipe on more S1 pictures",
}


def _final_eval(stage) -> dict:
    finals = [e for e in stage.evals if e.get("final")] or stage.evals
    if not finals:
        raise ValueError(f"stage {stage.name} has no eval record: set eval.heldout_data and keep the end-of-stage eval")
    return finals[-1]


def measure_variant(run_dir: str | Path, probes: str | Path, probe_limit: int | None = None) -> dict:
    """The figures of one finished run (see the module docstring); scores the probes on its
    last stage's weights (evip/demo/accuracy.py, option log-likelihood)."""
    from evip.demo.accuracy import run_accuracy

    run_dir = Path(run_dir)
    stages = read_metrics(run_dir / "metrics.jsonl")
    base = read_start_losses(run_dir, stages)
    count_trainable(run_dir, stages)
    last = _final_eval(stages[-1])
    if "heldout_caption_loss" not in last:
        raise ValueError(f"{run_dir}: the last stage's eval has no held-out caption loss: set eval.heldout_data")
    probe = run_accuracy(run_dir, probes, probe_limit)
    own, other = last["heldout_caption_loss"], last["heldout_caption_loss_other_image"]
    samples = sum(r.get("samples_per_s", 0.0) * r.get("step_time", 0.0) for s in stages for r in s.train)
    return {
        "stages": [s.name for s in stages],
        "steps": sum(s.steps for s in stages),
        "samples": int(round(samples)),
        "seconds": round(sum(s.seconds for s in stages), 1),
        "trainable_params": stages[-1].trainable_params,
        "text_loss_base": base,
        "text_loss": last.get("text_loss"),
        "text_loss_change": None if base is None else last["text_loss"] - base,
        "text_identical": base is not None and last.get("text_loss") == base,
        "heldout_caption_loss": own,
        "heldout_caption_loss_other_image": other,
        "image_gain": other - own,
        "image_ratio": other / own if own > 0 else math.inf,
        "probe": {kind: v["accuracy"] for kind, v in probe.per_kind.items()},
        "probe_chance": {kind: v["chance"] for kind, v in probe.per_kind.items()},
        "probe_n": probe.n,
    }


def _ppl(loss: float | None) -> str:
    return "-" if loss is None else f"{math.exp(loss):.4f}"


def table_markdown(name: str, results: dict[str, dict]) -> str:
    lines = [f"# {name}", "",
             "Text perplexity on a real corpus (CPython's pydoc topics) before → after; held-out caption "
             "loss at the end with the caption's own picture / another picture; probe accuracy = the "
             "likeliest of the captions that change one object's colour (6-way) or shape (4-way).", ""]
    studies = list(dict.fromkeys(st for m in results.values() for st in m["studies"]))
    for study in studies:
        lines += [f"## {STUDY_TITLES.get(study, study)}", "",
                  "| variant | pictures | steps | trainable | text perplexity | caption loss own / other | "
                  "image gain | colour | shape | time |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in (m for m in results.values() if study in m["studies"]):
            ppl = f"{_ppl(m['text_loss_base'])} → {_ppl(m['text_loss'])}"
            ppl += " (identical)" if m["text_identical"] else ""
            chance = m.get("probe_chance", {})
            lines.append(
                f"| {m['label']} | {m['samples']:,} | {m['steps']} | {m['trainable_params'] or 0:,} | {ppl} | "
                f"{m['heldout_caption_loss']:.3f} / {m['heldout_caption_loss_other_image']:.3f} | "
                f"{m['image_gain']:.3f} | {100 * m['probe'].get('colour', 0):.0f}% (chance {100 * chance.get('colour', 0):.0f}%) | "
                f"{100 * m['probe'].get('shape', 0):.0f}% (chance {100 * chance.get('shape', 0):.0f}%) | {m['run_seconds']:.0f} s |")
        lines.append("")
    return "\n".join(lines)


def plot_ablations(results: dict[str, dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    labels = [results[n]["label"] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.bar(range(len(names)), [results[n]["image_gain"] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_title("held-out image gain (loss other - own picture)")
    ax = axes[1]
    width = 0.4
    for j, (kind, colour) in enumerate((("colour", "tab:orange"), ("shape", "tab:green"))):
        ax.bar([i + (j - 0.5) * width for i in range(len(names))],
               [100 * results[n]["probe"].get(kind, 0) for n in names], width, label=kind, color=colour)
        chance = [100 * results[n].get("probe_chance", {}).get(kind, 0) for n in names]
        if chance:
            ax.axhline(max(chance), color=colour, ls=":", lw=1)
    ax.set_xticks(range(len(names)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title("held-out probe accuracy, % (dotted: chance)")
    ax.legend(fontsize=8)
    ax = axes[2]
    scaling = sorted((m for m in results.values() if "data_scaling" in m["studies"]), key=lambda m: m["samples"])
    if scaling:
        xs = [m["samples"] for m in scaling]
        ax.plot(xs, [100 * m["probe"].get("colour", 0) for m in scaling], "o-", color="tab:orange", label="colour %")
        ax.plot(xs, [100 * m["probe"].get("shape", 0) for m in scaling], "o-", color="tab:green", label="shape %")
        ax.set_xscale("log")
        ax.set_xlabel("S1 pictures trained on")
        ax.set_ylim(0, 100)
        ax2 = ax.twinx()
        ax2.plot(xs, [m["image_gain"] for m in scaling], "s--", color="tab:blue", label="image gain")
        ax2.set_ylabel("image gain")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
    ax.set_title("data scaling")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_ablation_report(run_dir: str | Path, name: str, results: dict[str, dict]) -> dict:
    run_dir = Path(run_dir)
    summary = {"name": name, "variants": results}
    (run_dir / "ablations.json").write_text(json.dumps(summary, indent=1))
    (run_dir / "ablations.md").write_text(table_markdown(name, results))
    plot_ablations(results, run_dir / "ablations.png")
    return summary
