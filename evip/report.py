"""`evip report RUN_DIR`: plots and a markdown summary of a pipeline run, from its metrics.jsonl.

Reads (written by evip/metrics.py and evip/pipeline.py):
    metrics.jsonl                    {"kind": "train", "stage", "step", "loss", "loss_caption|chat|text",
                                      "tokens_total", "tokens_per_s", "data_wait_frac", "step_time", "time"}
                                     {"kind": "eval", "stage", "step", "time", <eval values>}
    base/model_config.json           to count each stage's trainable parameters (meta device, no memory)
    stages/<i>_<name>/stage.yaml     the stage's trainable groups
    stages/<i>_<name>/eval_start.json  text-only loss at the stage's start (evip/evals.py)
    eval_base.json                   text-only loss of the base LLM (evip/evals.py)
    accuracy.json (optional)         held-out accuracy (evip/demo/accuracy.py AccuracyResult.to_dict())
Writes into RUN_DIR/report/ (or --out):
    loss.png         training loss per stage, one panel per stage, one line per sample kind
    forgetting.png   text-only perplexity on the real corpus through the stages vs the base LLM
    throughput.png   tokens/s per step, coloured by stage
    data_wait.png    fraction of each step spent waiting for data
    summary.md       one row per stage: trainable parameters, steps, tokens, caption loss
                     start -> end, held-out caption loss with its own / another image,
                     text-only perplexity start -> end, time; then the data each stage read
                     (the `data/...` keys of its last train record: per source the samples used,
                     realised mixture, bad and filtered samples by reason; packing efficiency);
                     then the accuracy
A run that was resumed has repeated step numbers in metrics.jsonl; the last record of a step wins.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("caption", "chat", "text")
# eval value names (evip/evals.py): the text-only forgetting monitor and the held-out caption loss
TEXT_LOSS_KEYS = ("text_loss",)
CAPTION_LOSS_KEYS = ("heldout_caption_loss",)
OTHER_IMAGE_LOSS_KEYS = ("heldout_caption_loss_other_image",)   # the same captions under other pictures
STAGE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


@dataclass
class StageMetrics:
    name: str
    train: list[dict] = field(default_factory=list)     # one record per step, in step order
    evals: list[dict] = field(default_factory=list)     # in step order
    trainable_params: int | None = None
    total_params: int | None = None
    start_text_loss: float | None = None                # stages/<i>_<name>/eval_start.json

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.train
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def steps(self) -> int:
        return max((r["step"] for r in self.train), default=0)

    @property
    def tokens(self) -> int:
        return max((r.get("tokens_total", 0) for r in self.train), default=0)

    @property
    def seconds(self) -> float:
        return sum(r.get("step_time", 0.0) for r in self.train)


def _first(record: dict, keys: tuple[str, ...]):
    for k in keys:
        if isinstance(record.get(k), (int, float)):
            return float(record[k])
    return None


def read_metrics(path: str | Path) -> list[StageMetrics]:
    """Stages in the order they first appear; per stage, the last record of each step wins."""
    stages: dict[str, StageMetrics] = {}
    train: dict[str, dict[int, dict]] = {}
    evals: dict[str, dict[int, dict]] = {}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this a run directory of `evip run`?")
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line (a crash mid-write leaves at most the "
                             "last line torn; delete it)") from None
        stage = rec.get("stage")
        if stage is None or rec.get("kind") not in ("train", "eval"):
            continue
        stages.setdefault(stage, StageMetrics(stage))
        (train if rec["kind"] == "train" else evals).setdefault(stage, {})[int(rec["step"])] = rec
    for name, s in stages.items():
        s.train = [train.get(name, {})[k] for k in sorted(train.get(name, {}))]
        s.evals = [evals.get(name, {})[k] for k in sorted(evals.get(name, {}))]
    return list(stages.values())


def _stage_dirs(run_dir: Path) -> dict[str, Path]:
    """{stage name: its directory} from stages/<i>_<name>/stage.yaml."""
    from omegaconf import OmegaConf
    out = {}
    for stage_yaml in sorted((run_dir / "stages").glob("*/stage.yaml")):
        out[str(OmegaConf.load(stage_yaml).get("name"))] = stage_yaml.parent
    return out


def read_start_losses(run_dir: Path, stages: list[StageMetrics]) -> float | None:
    """Fill each stage's start text-only loss; return the base LLM's (None when not measured)."""
    dirs = _stage_dirs(run_dir)
    for s in stages:
        f = dirs.get(s.name, run_dir / "-") / "eval_start.json"
        if f.is_file():
            s.start_text_loss = json.loads(f.read_text()).get("text_loss")
    base = run_dir / "eval_base.json"
    return json.loads(base.read_text()).get("text_loss") if base.is_file() else None


def count_trainable(run_dir: Path, stages: list[StageMetrics]) -> None:
    """Fill trainable/total parameters from the run's model config and each stage's groups."""
    cfg_file = run_dir / "base" / "model_config.json"
    if not cfg_file.is_file():
        return
    import torch
    from omegaconf import OmegaConf

    from evip.model.config import ModelConfig
    from evip.model.groups import named_groups
    from evip.model.mono import MonoInternVL

    with torch.device("meta"):
        model = MonoInternVL(ModelConfig(**json.loads(cfg_file.read_text())))
    sizes = {g: sum(p.numel() for _, p in ps) for g, ps in named_groups(model).items()}
    total = sum(sizes.values())
    for stage_dir in _stage_dirs(run_dir).values():
        cfg = OmegaConf.load(stage_dir / "stage.yaml")
        groups = list(cfg.get("trainable", []))
        for s in stages:
            if s.name == cfg.get("name"):
                s.total_params = total
                s.trainable_params = total if "all" in groups else sum(sizes.get(g, 0) for g in groups)


# ---- plots ---------------------------------------------------------------------------------

def _offsets(stages: list[StageMetrics]) -> list[int]:
    out, acc = [], 0
    for s in stages:
        out.append(acc)
        acc += s.steps
    return out


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data in metrics.jsonl", transform=ax.transAxes, ha="center", color="grey")


def _stage_bounds(ax, stages, offsets) -> None:
    lo, hi = ax.get_xlim()
    for s, off in zip(stages, offsets):
        if not lo <= off <= hi:
            continue
        if off:
            ax.axvline(off, color="grey", lw=0.8, ls=":")
        ax.text(off, 1.01, s.name, transform=ax.get_xaxis_transform(), va="bottom", fontsize=7,
                color="dimgrey")


def plot_loss(stages: list[StageMetrics], out: Path) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.2), squeeze=False)
    for ax, s in zip(axes[0], stages):
        for kind, colour in zip(KINDS, ("tab:blue", "tab:green", "tab:grey")):
            x, y = s.series(f"loss_{kind}")
            if x:
                ax.plot(x, y, color=colour, lw=1.2, label=kind)
        x, y = s.series("loss")
        ax.plot(x, y, color="black", lw=0.6, ls="--", label="all")
        ax.set_title(s.name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        _legend(ax)
    axes[0][0].set_ylabel("training loss (nats/token)")
    fig.suptitle("Loss per stage and sample kind", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_forgetting(stages: list[StageMetrics], base_loss: float | None, out: Path) -> None:
    import matplotlib.pyplot as plt
    offsets = _offsets(stages)
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for i, (s, off) in enumerate(zip(stages, offsets)):
        pts = [(off, math.exp(s.start_text_loss))] if s.start_text_loss is not None else []
        pts += [(off + e["step"], math.exp(v)) for e in s.evals if (v := _first(e, TEXT_LOSS_KEYS)) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    color=STAGE_COLOURS[i % len(STAGE_COLOURS)], label=s.name)
    if base_loss is not None:
        ax.axhline(math.exp(base_loss), color="black", lw=0.8, ls="--",
                   label=f"base LLM ({math.exp(base_loss):.2f})")
    _stage_bounds(ax, stages, offsets)
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel("text-only perplexity")
    ax.set_title("Forgetting monitor: text-only perplexity on a real corpus", fontsize=10, pad=14)
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_per_step(stages, key: str, ylabel: str, title: str, out: Path, scale: float = 1.0,
                   ylim=None) -> None:
    import matplotlib.pyplot as plt
    offsets = _offsets(stages)
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    for i, (s, off) in enumerate(zip(stages, offsets)):
        x, y = s.series(key)
        ax.plot([off + v for v in x], [scale * v for v in y], lw=1.0,
                color=STAGE_COLOURS[i % len(STAGE_COLOURS)], label=s.name)
    _stage_bounds(ax, stages, offsets)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel("step (all stages)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10, pad=14)
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ---- the summary ---------------------------------------------------------------------------

def _fmt_params(n: int | None, total: int | None) -> str:
    if n is None:
        return "?"
    return f"{n:,} ({100 * n / total:.0f}%)" if total else f"{n:,}"


def _start_end(start: float | None, end: float | None, digits: int, exp: bool = False) -> str:
    if start is None or end is None:
        return "-"
    f = (lambda v: math.exp(v)) if exp else (lambda v: v)
    text = f"{f(start):.{digits}f} -> {f(end):.{digits}f}"
    return text + (" (identical)" if start == end else "")


def _window_means(values: list[float]) -> tuple[float | None, float | None]:
    """Means of the first and last tenth of a series (1 to 5 points each): step losses are noisy."""
    if not values:
        return None, None
    k = min(5, max(1, len(values) // 10))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def stage_row(s: StageMetrics) -> list[str]:
    ev_caption = [v for e in s.evals if (v := _first(e, CAPTION_LOSS_KEYS)) is not None]
    kind = next((k for k in ("caption", "chat") if s.series(f"loss_{k}")[0]), None)
    if len(ev_caption) >= 2:
        loss, label = (ev_caption[0], ev_caption[-1]), "held-out caption"
    elif kind is not None:
        loss, label = _window_means(s.series(f"loss_{kind}")[1]), kind
    else:
        loss, label = _window_means(s.series("loss")[1]), "all"
    ev_text = [v for e in s.evals if (v := _first(e, TEXT_LOSS_KEYS)) is not None]
    start = s.start_text_loss if s.start_text_loss is not None else (ev_text[0] if ev_text else None)
    text = (start, ev_text[-1]) if ev_text else (None, None)
    last = s.evals[-1] if s.evals else {}
    own, other = _first(last, CAPTION_LOSS_KEYS), _first(last, OTHER_IMAGE_LOSS_KEYS)
    reliance = "-" if own is None or other is None else f"{own:.3f} / {other:.3f}"
    return [s.name, _fmt_params(s.trainable_params, s.total_params), str(s.steps), f"{s.tokens:,}",
            f"{_start_end(*loss, 3)} ({label})", reliance, _start_end(*text, 4, exp=True), f"{s.seconds:.0f} s"]


def data_markdown(stages: list[StageMetrics]) -> list[str]:
    """The data accounting of each stage's last train record that has it (evip/data/accounting.py
    `data_record`): one row per source."""
    rows = []
    for s in stages:
        last = next((r for r in reversed(s.train) if "data/packing_efficiency" in r), None)
        if last is None:
            continue
        sources = sorted({k.split("/")[2] for k in last if k.startswith(("data/samples/", "data/bad/", "data/filtered/"))})
        for src in sources:
            def reasons(kind: str) -> str:
                got = {k.rsplit("/", 1)[1]: v for k, v in last.items() if k.startswith(f"data/{kind}/{src}/")}
                return ", ".join(f"{r}: {n:,}" for r, n in sorted(got.items())) or "-"
            rows.append(f"| {s.name} | {src} | {last.get(f'data/samples/{src}', 0):,} | "
                        f"{last.get(f'data/mixture/{src}', 0.0):.3f} | {reasons('bad')} | {reasons('filtered')} | "
                        f"{last['data/packing_efficiency']:.3f} |")
    if not rows:
        return []
    return ["", "## Data", "",
            "Per stage and source, as of the stage's last logged step (all ranks): samples used, their share "
            "(the realised mixture), bad samples and filtered samples by reason, and the packing efficiency "
            "(real tokens / token budget) of the stage.", "",
            "| stage | source | samples | realised share | bad (reason: n) | filtered (reason: n) | packing |",
            "|---|---|---|---|---|---|---|", *rows]


def summary_markdown(stages: list[StageMetrics], accuracy: dict | None) -> str:
    head = ["stage", "trainable params", "steps", "tokens", "caption loss start -> end",
            "held-out caption loss: own / other image", "text-only perplexity start -> end", "time"]
    lines = ["# EViP run summary", "",
             "Caption loss: the held-out caption loss at the stage's first and last eval when there "
             "are two, else the training loss of the stage's main kind (caption; chat in "
             "instruction tuning) averaged over the first and last tenth of its steps (1-5 steps). "
             "Own / other image: the held-out caption loss at the stage's last eval, and the same "
             "captions each shown with another held-out picture; equal values mean the model does "
             "not use the image yet. "
             "Text-only perplexity: exp(text-only loss) on a real corpus at the stage's start and at "
             "its last eval; '(identical)' means the two losses are equal bit for bit.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(stage_row(s)) + " |" for s in stages]
    total = sum(s.seconds for s in stages)
    lines += ["", f"Total training time: {total:.0f} s over {sum(s.steps for s in stages)} steps."]
    lines += data_markdown(stages)
    if accuracy:
        lines += ["", "## Held-out accuracy", "",
                  f"{accuracy['correct']}/{accuracy['n']} = **{100 * accuracy['accuracy']:.1f}%** "
                  f"(chance {100 * accuracy['chance']:.1f}%, majority answer {100 * accuracy['majority']:.1f}%)",
                  "", "| question kind | n | accuracy | chance | majority |", "|---|---|---|---|---|"]
        for kind, v in accuracy.get("per_kind", {}).items():
            lines.append(f"| {kind} | {v['n']} | {100 * v['accuracy']:.1f}% | {100 * v['chance']:.1f}% "
                         f"| {100 * v['majority']:.1f}% |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the plots and summary.md; return {name: path}."""
    import matplotlib
    matplotlib.use("Agg")

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    stages = read_metrics(run_dir / "metrics.jsonl")
    if not stages:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no train or eval record yet")
    count_trainable(run_dir, stages)
    base_loss = read_start_losses(run_dir, stages)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.png" for name in ("loss", "forgetting", "throughput", "data_wait")}
    plot_loss(stages, files["loss"])
    plot_forgetting(stages, base_loss, files["forgetting"])
    _plot_per_step(stages, "tokens_per_s", "tokens / s", "Throughput (tokens per second, all ranks)",
                   files["throughput"])
    _plot_per_step(stages, "data_wait_frac", "% of step", "Time waiting for data", files["data_wait"],
                   scale=100.0, ylim=(0, 100))
    acc_file = run_dir / "accuracy.json"
    accuracy = json.loads(acc_file.read_text()) if acc_file.is_file() else None
    files["summary"] = out / "summary.md"
    files["summary"].write_text(summary_markdown(stages, accuracy))
    return files
