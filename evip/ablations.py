"""`evip ablate FILE`: the paper's ablations in miniature, as a table of pipeline variants.

    evip ablate demo/ablations.yaml --run-dir runs/ablations base.source=...

An ablation file names one pipeline, overrides shared by every variant, held-out caption probes
and the variants. A variant is configuration only: pipeline overrides such as
`model.visual_ffn=random`, `stages_all.trainable=[...]` or `s1_1_concept.steps=12`, never another
trainer. Each variant runs as its own `evip run` process (same base LLM, data and seed) into
RUN_DIR/<variant>/, then is measured the same way (evip/ablation_report.py): text-only
perplexity against the base LLM, held-out caption loss with the caption's own picture and with
another one, and probe accuracy (the likeliest caption among ones that change one object's colour,
or its shape). A variant whose run finished and was measured is not run again: rerunning the
command continues an interrupted ablation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from omegaconf import MISSING

from evip.config import ConfigError, load_config

MEASURED = "ablation.json"        # a variant's measurements, in its run dir


@dataclass
class VariantConfig:
    name: str = MISSING            # its run dir's name; letters, digits, _ and -
    studies: list[str] = field(default_factory=list)   # the questions it answers: frozen_llm, visual_expert, data_scaling
    label: str = ""                # what it is, for tables and plots
    overrides: list[str] = field(default_factory=list)   # pipeline overrides (as `evip run` takes)


@dataclass
class AblationConfig:
    name: str = "ablations"
    pipeline: str = MISSING        # relative to the ablation file
    overrides: list[str] = field(default_factory=list)   # every variant, before its own
    probes: str = MISSING          # held-out caption probes (evip demo-data: DATA/heldout/probes.json)
    probe_limit: int = 0           # 0: every probe
    variants: list[VariantConfig] = field(default_factory=list)


@dataclass
class LoadedAblation:
    cfg: AblationConfig
    path: Path

    @property
    def pipeline(self) -> Path:
        return (self.path.parent / self.cfg.pipeline).resolve()


def load_ablation(path: str | Path, overrides: Sequence[str] = ()) -> LoadedAblation:
    """The ablation file with `overrides` added to every variant's; checked before any run:
    variant names unique and usable as directory names, every variant's pipeline loads."""
    from evip.pipeline import load_pipeline

    path = Path(path)
    cfg = load_config(AblationConfig, path)
    cfg.overrides = [*cfg.overrides, *overrides]
    la = LoadedAblation(cfg, path)
    if not cfg.variants:
        raise ConfigError(f"'variants' in {path} is empty: list at least one variant")
    names = [v.name for v in cfg.variants]
    for v in cfg.variants:
        if not v.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"variant name {v.name!r} in {path}: use letters, digits, _ and - (it names a directory)")
        if not v.studies:
            raise ConfigError(f"variant {v.name!r} in {path} has no 'studies': name the comparison(s) it belongs to")
        if names.count(v.name) > 1:
            raise ConfigError(f"variant name {v.name!r} appears twice in {path}")
        try:
            load_pipeline(la.pipeline, variant_overrides(la, v))
        except ConfigError as e:
            raise ConfigError(f"variant {v.name!r} of {path}: {e}") from None
    return la


def variant_overrides(la: LoadedAblation, variant: VariantConfig) -> list[str]:
    return [*la.cfg.overrides, *variant.overrides]


def run_variant(la: LoadedAblation, variant: VariantConfig, run_dir: Path) -> float:
    """`evip run` of one variant in a process of its own (a fresh interpreter, allocator and
    DeepSpeed per variant, as a user's run would be); returns its wall time in seconds."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC_")}
    cmd = [sys.executable, "-m", "evip.cli", "run", str(la.pipeline), *variant_overrides(la, variant),
           "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant.name!r} failed (exit {proc.returncode}); its log is above, its run "
                           f"dir {run_dir}; rerun the same command to continue it:\n  {' '.join(cmd)}")
    return time.perf_counter() - t0


def probes_path(la: LoadedAblation) -> Path:
    """`probes` of the ablation file under the path rule (evip/config.py `resolve_path`): relative to
    the file, or from the working directory with a warning when only that has it. Applied to the
    interpolated value, so `${oc.env:EVIP_DEMO_DATA,runs/demo/data}/...` follows the rule too."""
    from evip.config import resolve_path

    probes = Path(resolve_path(la.cfg.probes, la.path.resolve().parent, "probes", str(la.path))).expanduser()
    if not probes.is_file():
        raise ConfigError(f"'probes' in {la.path}: {la.cfg.probes} not found beside the file ({probes}) nor from the "
                          "working directory (evip demo-data DATA writes DATA/heldout/probes.json)")
    return probes


def run_ablations(la: LoadedAblation, run_dir: str | Path, log=print) -> dict:
    """Run and measure every variant not yet measured, then write the table, plots and JSON."""
    from evip.ablation_report import measure_variant, write_ablation_report

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    probes = probes_path(la)
    results = {}
    for i, v in enumerate(la.cfg.variants):
        vdir = run_dir / v.name
        done = vdir / MEASURED
        if done.is_file():
            results[v.name] = json.loads(done.read_text())
            log(f"[ablate] {v.name}: measured already ({done})")
            continue
        log(f"[ablate] {i + 1}/{len(la.cfg.variants)} {v.name} ({', '.join(v.studies)}): "
            f"{' '.join(v.overrides) or 'as configured'}")
        seconds = run_variant(la, v, vdir)
        m = measure_variant(vdir, probes, la.cfg.probe_limit or None)
        m |= {"studies": list(v.studies), "label": v.label or v.name, "overrides": v.overrides, "run_seconds": round(seconds, 1)}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(m, indent=1))
        tmp.replace(done)                     # measured = published whole
        results[v.name] = m
        log(f"[ablate] {v.name}: image gain {m['image_gain']:.3f}, colour {m['probe']['colour']:.0%}, "
            f"shape {m['probe']['shape']:.0%}, text loss change {m['text_loss_change']:+.4g}")
    return write_ablation_report(run_dir, la.cfg.name, results)
